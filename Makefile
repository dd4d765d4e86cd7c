.PHONY: demo test bench lint

demo:  ## the end-to-end demo on a local control plane
	bash hack/demo.sh

test:  ## set-up, static checks, unit and e2e tests
	bash hack/test.sh

bench:  ## benchmark tables quoted in the README (each operator benchmark starts its own control plane)
	python3 bench/decision.py
	python3 bench/proxy.py
	python3 bench/revocation.py
	python3 bench/admission.py
	python3 bench/minting.py
	python3 bench/adversarial.py

lint:
	ruff check capgate tests e2e bench examples && mypy capgate && lint-imports
