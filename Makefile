.PHONY: demo test bench lint image

demo:  ## the end-to-end demo on real pods, on a local cluster with a real node
	bash hack/demo.sh

test:  ## set-up, static checks, unit and e2e tests
	bash hack/test.sh

image:  ## the capgate and pause images, built locally without a registry (bash hack/image.sh save: tarballs too)
	bash hack/image.sh

bench:  ## benchmark tables quoted in the README (each operator benchmark starts its own control plane)
	.venv/bin/python bench/decision.py
	.venv/bin/python bench/proxy.py
	.venv/bin/python bench/revocation.py
	.venv/bin/python bench/admission.py
	.venv/bin/python bench/minting.py
	.venv/bin/python bench/adversarial.py
	.venv/bin/python bench/availability.py
	.venv/bin/python bench/usage.py
	.venv/bin/python bench/mcp_calls.py

lint:
	.venv/bin/ruff check capgate tests e2e bench examples && .venv/bin/mypy capgate && .venv/bin/lint-imports
