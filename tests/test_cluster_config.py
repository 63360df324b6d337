"""The cluster's files, checked without a cloud or a Docker engine: cluster/aws.yaml through Ray's own
validation plus the rules Ray does not check, the KubeRay RayJob's shape, the Dockerfile through
hadolint and against pyproject.toml, and every `deeprec` command the docs show through the CLI: each
`train` command resolved by the config builders (`--dry-run`), the others through its parser."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import ray
import tomllib
import yaml
from packaging.specifiers import SpecifierSet

from deeprecognition.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


PYPROJECT = tomllib.loads(read("pyproject.toml"))
AWS = yaml.safe_load(read("cluster/aws.yaml"))
RAYJOB = yaml.safe_load(read("cluster/kuberay-rayjob.yaml"))
DOCKERFILE = read("Dockerfile")
# Credentials that must never be written into a config, an image or a job.
SECRETS = re.compile(
    r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET|AWS_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN|PASSWORD", re.I
)


def base_image() -> tuple[str, str]:
    """(Ray version, "py311") of the Dockerfile's base, which every stage must share."""
    bases = set(re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.M))
    assert len(bases) == 1, f"every stage must start from the same base: {bases}"
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py3\d+)-gpu", bases.pop())
    assert match, "the base must be a Ray GPU image, rayproject/ray:VERSION-pyXY-gpu"
    return match.group(1), match.group(2)


def project_image() -> str:
    """The image name the Makefile builds: REGISTRY/deeprecognition:VERSION-rayRAY-pyXY-gpu."""
    return re.search(r"^IMAGE \?= (\S+)$", read("Makefile"), re.M).group(1)


def test_dockerfile_base_agrees_with_pyproject_and_the_tested_ray():
    ray_version, py = base_image()
    [ray_pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    assert ray_version in SpecifierSet(ray_pin.split("]", 1)[1]) and ray_version == ray.__version__
    assert f"{py[2]}.{py[3:]}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert f"py3{sys.version_info.minor}" == py, "the image's Python is the one the tests run on"
    assert project_image().endswith(f":{PYPROJECT['project']['version']}-ray{ray_version}-{py}-gpu")


def test_dockerfile_installs_this_package_as_a_non_root_user_without_credentials():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not SECRETS.search(DOCKERFILE)
    assert not re.search(r"^(ENV|ARG)\s+\S*(KEY|TOKEN|SECRET)", DOCKERFILE, re.M | re.I)
    # The dependencies are pyproject.toml's own list (no second copy of the pins to drift), and
    # the package is a wheel built from this repository.
    assert (
        "tomllib.load(open('/tmp/pyproject.toml'" in DOCKERFILE
        and "pip install --no-cache-dir -r /tmp/requirements.txt" in DOCKERFILE
    )
    assert "pip wheel --no-cache-dir --no-deps" in DOCKERFILE and "deeprecognition-*.whl" in DOCKERFILE


def test_dockerfile_passes_hadolint():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    assert os.path.exists(hadolint), "hadolint comes with the test extras: make install"
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    ignore = [line for line in read(".dockerignore").splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "*"  # an allowlist: no .venv, shards or .git in the context
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        src
        for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
        for src in line.split()[:-1]
        if not src.startswith("--")
    }
    assert copied <= allowed, copied - allowed


def test_aws_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(AWS))  # what `ray up` does before it calls AWS
    validate_config(prepared)
    assert prepared["setup_commands"] == [] and prepared["docker"]["image"] == project_image()


def test_aws_node_types_follow_the_rules_ray_does_not_check():
    types = AWS["available_node_types"]
    head = types[AWS["head_node_type"]]
    assert (
        head["resources"].get("GPU", 0) == 0 and "InstanceMarketOptions" not in head["node_config"]
    )  # a CPU head, on demand
    for name, node in types.items():
        assert all(isinstance(v, int) for v in node["resources"].values()), name
        assert re.fullmatch(r"ami-[0-9a-f]{17}", node["node_config"]["ImageId"]), f"{name}: name a current GPU AMI"
        assert node["node_config"]["IamInstanceProfile"]["Name"] in read("cluster/aws-iam.sh"), (
            f"{name}: an instance profile for S3"
        )
    workers = {name: node for name, node in types.items() if node is not head}
    gpu = {name: node for name, node in workers.items() if node["resources"].get("GPU")}
    assert {node["resources"]["GPU"] for node in gpu.values()} == {1, 8}
    assert all(node["min_workers"] == 0 for node in workers.values())  # nothing runs, nothing is paid
    for name, node in workers.items():
        if node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot":
            gpus = node["resources"].get("GPU", 0)
            fallback = [
                n
                for n, other in workers.items()
                if other["resources"].get("GPU", 0) == gpus and "InstanceMarketOptions" not in other["node_config"]
            ]
            assert fallback and all(workers[n]["priority"] < node["priority"] for n in fallback), (
                f"{name}: an on-demand fallback"
            )
    assert AWS["idle_timeout_minutes"] > 0 and AWS["provider"]["cache_stopped_nodes"] is False
    assert not SECRETS.search(read("cluster/aws.yaml"))


def test_every_aws_gpu_node_type_names_a_gpu_type_that_gpu_type_accepts():
    from deeprecognition.runs.placement import ACCELERATOR_PREFIX, check_gpu_type

    named = {}
    for name, node in AWS["available_node_types"].items():
        types = [k[len(ACCELERATOR_PREFIX) :] for k in node["resources"] if k.startswith(ACCELERATOR_PREFIX)]
        assert len(types) == (1 if node["resources"].get("GPU") else 0), name
        if types:
            named[name] = types[0]
    for gpu_type in set(named.values()):
        check_gpu_type(gpu_type)  # the autoscaler starts these nodes for `--gpu-type NAME`
    assert set(named.values()) == {"L40S", "A100", "H100"}
    with pytest.raises(ValueError, match="did you mean H100"):
        check_gpu_type("h100")


def test_the_image_and_both_cluster_files_turn_on_the_dashboards_train_page():
    assert re.search(r"^ENV RAY_TRAIN_ENABLE_STATE_TRACKING=1$", read("Dockerfile"), re.M)
    assert "--env RAY_TRAIN_ENABLE_STATE_TRACKING=1" in AWS["docker"]["run_options"]
    cluster = RAYJOB["spec"]["rayClusterSpec"]
    containers = [
        c for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]
    ]
    assert all({"name": "RAY_TRAIN_ENABLE_STATE_TRACKING", "value": "1"} in c["env"] for c in containers)


def test_the_one_time_iam_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", os.path.join(REPO, "cluster/aws-iam.sh")]).returncode == 0


def test_kuberay_rayjob_runs_the_same_image_and_a_deeprec_entrypoint(capsys):
    assert RAYJOB["apiVersion"] == "ray.io/v1" and RAYJOB["kind"] == "RayJob"
    spec = RAYJOB["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == base_image()[0] and spec["shutdownAfterJobFinishes"] is True
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for pod in pods for c in pod["containers"]} == {project_image()}
    assert all(pod["securityContext"]["runAsNonRoot"] and pod["serviceAccountName"] for pod in pods)
    [gpu] = [
        g
        for g in cluster["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    assert gpu["minReplicas"] == 0 and cluster["enableInTreeAutoscaling"] is True
    assert not SECRETS.search(read("cluster/kuberay-rayjob.yaml"))
    assert_resolves(shlex.split(spec["entrypoint"]), capsys)


def deeprec_commands(markdown: str) -> list[list[str]]:
    """The arguments of every `deeprec ...` and `python -m deeprecognition ...` in a document's
    bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "deeprec" or (word == "deeprecognition" and words[i - 1] == "-m"):
                    commands.append(words[i + 1 :])
                    break
    return commands


def _argv(words: list[str]) -> list[str]:
    """The arguments of a command line that starts `python -m deeprecognition` or has none of it."""
    return words[3:] if words[:3] == ["python", "-m", "deeprecognition"] else words


class _Parsed(BaseException):
    """Raised in place of running a command once its arguments parsed (not an Exception: nothing
    on the way out may take it for an error of the command)."""


def assert_parses(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`deeprec WORDS` through the CLI's own main up to where its arguments are parsed, stopping
    there: for commands without a --dry-run (pack, tune, evaluate, ...), which would run."""
    words = _argv(words)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, *args, **kwargs):
        parse_args(parser, *args, **kwargs)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(words)
        except SystemExit:
            pytest.fail(f"not a valid deeprec command: {' '.join(words)}")
        except _Parsed:
            return
    pytest.fail(f"deeprec {' '.join(words)} ran without parsing its arguments")


def assert_dry_run(words: list[str], capsys: pytest.CaptureFixture) -> dict:
    """`deeprec train ... --dry-run`: the config builders resolve the command (preset, flags, --set)
    and check every field, then the resolved config comes out as JSON, which is returned."""
    words = _argv(words)
    capsys.readouterr()
    code = main([*words, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, f"deeprec {' '.join(words)} --dry-run: {err.strip()}"
    return json.loads(out)


def flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def assert_resolves(words: list[str], capsys: pytest.CaptureFixture) -> None:
    """A train command's resolved config holds what its flags say."""
    cfg = assert_dry_run(words, capsys)
    for option, value in (("--data", cfg["data"]["data"]), ("--storage", cfg["storage"]), ("--name", cfg["name"])):
        assert flag(words, option) in (None, value), (option, words)
    if "--num-workers" in words:
        assert cfg["scale"]["num_workers"] == int(flag(words, "--num-workers"))
    assert cfg["scale"]["gpu"] is ("--gpu" in words)


@pytest.mark.parametrize("doc", ["cluster/README.md", "README.md"])
def test_every_deeprec_command_in_the_docs_resolves_or_parses(doc, capsys, monkeypatch):
    commands = deeprec_commands(read(doc))
    train = [words for words in commands if words[:1] == ["train"]]
    assert train and len(train) < len(commands)
    for words in commands:
        if words in train:
            assert_resolves(words, capsys)
        else:
            assert_parses(words, monkeypatch)


def test_a_misspelt_field_or_a_bad_value_in_a_documented_command_fails_the_check(capsys, monkeypatch):
    """What the checks above would catch in a doc: a --set field that does not exist, a value of the
    wrong type (both pass argparse and fail in the config builders), an option that does not exist."""
    [words, *_] = [w for w in deeprec_commands(read("README.md")) if w[:2] == ["train", "classifier"]]
    for bad, message in (
        (["--set", "optim.lrr=0.1"], "unknown field 'optim.lrr'"),
        (["--set", "model.layers=three"], "model.layers"),
    ):
        with pytest.raises(AssertionError, match=message):
            assert_dry_run(words + bad, capsys)
    with pytest.raises(pytest.fail.Exception, match="not a valid deeprec command"):
        assert_parses([*words, "--epochz", "3"], monkeypatch)
