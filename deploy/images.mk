# --- images (issue 15): one OCI image per service, built and run ------------------------
# Included by the Makefile. deploy/images/README.md says how, and what was measured.
#   make images          the four service images (IMAGE_TARGETS), tagged IMAGE_REPO:VERSION-TARGET
#   make image-base      the local Python 3.11 base from Debian's packages (debootstrap)
#   make image-smoke     the graph run from the built images, a blend through it, the checks
# On a machine that can pull python:3.11-slim-bookworm from Docker Hub:
#   make images IMAGE_TOOL=docker PYTHON_IMAGE=python:3.11-slim-bookworm

# buildah, else podman, else docker: the first one installed.
IMAGE_TOOL ?= $(shell for tool in buildah podman docker; do \
	command -v $$tool >/dev/null && { echo $$tool; break; }; done)
IMAGE_REPO ?= localhost/styleblend
IMAGE_TARGETS ?= gateway features blending reconstruction
# The Dockerfile's base by default is python:3.11-slim-bookworm; here it is the local one,
# which needs no registry but Debian's mirror (image-base makes it).
LOCAL_PYTHON_IMAGE := localhost/styleblend-python:3.11-bookworm
PYTHON_IMAGE ?= $(LOCAL_PYTHON_IMAGE)
# Unset: PyTorch's CPU index, or PyPI's (CUDA) build where that index cannot be reached.
TORCH_INDEX_URL ?=
IMAGE_ENV = IMAGE_TOOL=$(IMAGE_TOOL) IMAGE_REPO=$(IMAGE_REPO) PYTHON_IMAGE=$(PYTHON_IMAGE) \
	TORCH_INDEX_URL=$(TORCH_INDEX_URL)

.PHONY: images image-base image-smoke

image-base:
	IMAGE_TOOL=$(IMAGE_TOOL) deploy/images/base.sh $(LOCAL_PYTHON_IMAGE)

images: $(if $(filter $(LOCAL_PYTHON_IMAGE),$(PYTHON_IMAGE)),image-base)
	$(IMAGE_ENV) deploy/images/build.sh $(IMAGE_TARGETS)

# Uses the images already built (make images) and the model export (make models); the blend
# is sent by the host venv's `styleblend`. Needs root and buildah (deploy/images/smoke.py).
image-smoke: $(VENV)/.installed
	$(PY) deploy/images/smoke.py --repo $(IMAGE_REPO) --styleblend $(BIN)/styleblend
