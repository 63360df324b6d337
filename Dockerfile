# The image a DeepRecognition Ray cluster runs (cluster/aws.yaml, cluster/kuberay-rayjob.yaml): Ray
# with CUDA, plus this package. Build it from the repository root: `make image`.
# No credentials are baked in: nodes reach S3 through their IAM instance profile (IRSA on EKS).
# The base's Ray and Python must be those of pyproject.toml; tests/test_cluster_config.py checks.

# Build stage: a wheel of this package, so that no source tree or build folder reaches the image.
FROM rayproject/ray:2.60.0-py311-gpu AS wheel
COPY --chown=1000:100 pyproject.toml README.md /home/ray/build/
COPY --chown=1000:100 src /home/ray/build/src
WORKDIR /home/ray/build
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/ray/wheels .

FROM rayproject/ray:2.60.0-py311-gpu
# The dependencies in their own layer, read from pyproject.toml so that the image installs exactly
# the pins the tests ran with; a code change rebuilds only the small layer after it.
COPY --chown=1000:100 pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/pyproject.toml
# The last layer holds only the installed package: the wheel is mounted, never copied in.
RUN --mount=type=bind,from=wheel,source=/home/ray/wheels,target=/tmp/wheels \
    pip install --no-cache-dir --no-deps /tmp/wheels/deeprecognition-*.whl

# The dashboard's Train page (runs, workers, their state) reads what Ray Train records only with
# this set; without it the page answers HTTP 500.
ENV RAY_TRAIN_ENABLE_STATE_TRACKING=1

# The base image's non-root user `ray` (uid 1000, group users), by number so that Kubernetes'
# runAsNonRoot can check it.
USER 1000:100
WORKDIR /home/ray
