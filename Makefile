.PHONY: demo test bench lint

demo:  ## the end-to-end demo on a local control plane
	bash hack/demo.sh

test:  ## set-up, static checks, unit and e2e tests
	bash hack/test.sh

bench:  ## benchmark tables quoted in the README
	python3 bench/decision.py
	python3 bench/proxy.py

lint:
	ruff check capgate tests e2e bench examples && mypy capgate && lint-imports
