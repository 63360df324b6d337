# The image a DeepRecognition Ray cluster runs: Ray 2.60 with CUDA, plus this package.
# No credentials are baked in: on AWS the nodes get S3 access from their IAM instance profile.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/deeprecognition

# Dependencies first, in their own layer, so that a code change rebuilds only the small last layer.
COPY --chown=ray:users pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY --chown=ray:users README.md ./
COPY --chown=ray:users src ./src
RUN pip install --no-cache-dir --no-deps .

# The Ray base image's non-root user.
USER ray
