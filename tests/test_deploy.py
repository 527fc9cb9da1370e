"""deploy/ without a cluster: its files agree with each other, with KubeRay's and Ray's field names, and
with the real `superweight` CLI (every command in them is parsed by Click as a shell would pass it)."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from superweight.cli import cli

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"

KINDS = {
    "raycluster.yaml": ["PersistentVolumeClaim", "RayCluster"],
    "raycronjob.yaml": ["RayCronJob"],
    "cronjob.yaml": ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"],
    "secrets.example.yaml": ["Secret"],
}
API_VERSIONS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayCronJob": "ray.io/v1", "CronJob": "batch/v1",
                "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
                "ServiceAccount": "v1", "ConfigMap": "v1", "Secret": "v1", "PersistentVolumeClaim": "v1"}

# What a shell would put in place of a placeholder: every $(...) in these files computes a date.
COMMAND_SUBSTITUTION, DATE = re.compile(r"\$\((?:[^()]|\([^()]*\))*\)"), "2026-01-01"
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
VARIABLES = {"SUPERWEIGHT_PUBLISH_TARGET": "hf://datasets/org/name"}
OPERATORS = set("();<>|&")


def manifests(name: str) -> list[dict]:
    """The documents of deploy/NAME, then the manifests embedded in its ConfigMaps."""
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    embedded = [yaml.safe_load(text) for doc in docs if doc["kind"] == "ConfigMap"
                for key, text in doc["data"].items() if key.endswith(".yaml")]
    return docs + embedded


def launcher() -> dict:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def one(name: str, kind: str) -> dict:
    found = [doc for doc in manifests(name) if doc["kind"] == kind]
    assert len(found) == 1, f"deploy/{name}: expected one {kind}, found {len(found)}"
    return found[0]


def walk(node, key: str):
    """Every value stored under `key`, at any depth."""
    if isinstance(node, dict):
        for k, value in node.items():
            yield from [value] if k == key else walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction of deploy/Dockerfile, continuation lines joined."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def dockerfile_env() -> dict[str, str]:
    return dict(pair.split("=", 1) for instr, rest in dockerfile() if instr == "ENV" for pair in shlex.split(rest))


def superweight_args(script: str) -> list[list[str]]:
    """The arguments of every `superweight` command in a shell script, with placeholders filled in.

    A command is `superweight` (or a path to it) first in a simple command or right after `--` (as in
    `ray job submit ... -- superweight ...`); a quoted word holding a script (`sh -c '...'`) is searched too.
    """
    text = COMMAND_SUBSTITUTION.sub(DATE, script.replace("\\\n", " "))
    text = VARIABLE.sub(lambda m: VARIABLES.get(m[1], m[0]), text)
    found, pending = [], ""
    for line in text.splitlines():
        pending += line + "\n"
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # a quoted string goes on to the next line
            continue
        pending, words = "", []
        for token in tokens + [";"]:
            if set(token) <= OPERATORS:
                found += _command_args(words)
                words = []
            else:
                words.append(token)
    assert not pending, f"unbalanced quotes in {script!r}"
    return found


def _command_args(words: list[str]) -> list[list[str]]:
    for i, word in enumerate(words):
        if (i == 0 or words[i - 1] == "--") and (word == "superweight" or word.endswith("/superweight")):
            return [words[i + 1:]]
    return [args for word in words if " " in word and "superweight" in word for args in superweight_args(word)]


def commands_in(node) -> list[list[str]]:
    """`superweight` commands under the command-like keys of a YAML document."""
    values = [v for key in ("entrypoint", "command", "args") for v in walk(node, key)]
    if isinstance(node, dict):  # the launcher's *_commands, also per node type
        for section in [node, *node.get("available_node_types", {}).values()]:
            values += [v for key, v in section.items() if key.endswith("_commands")]
    return [args for value in values for args in value_commands(value)]


def value_commands(value) -> list[list[str]]:
    """`superweight` commands in a shell string, an argv list, or a list of shell strings."""
    if isinstance(value, list) and value and str(value[0]).rsplit("/", 1)[-1] == "superweight":
        return [[str(v) for v in value[1:]]]
    return [args for script in ([value] if isinstance(value, str) else value) for args in superweight_args(str(script))]


def all_superweight_commands() -> list[tuple[str, list[str]]]:
    """(file, arguments) for every `superweight` command in deploy/."""
    found = [(name, args) for name in sorted(KINDS) for doc in manifests(name) for args in commands_in(doc)]
    found += [("cluster.yaml", args) for args in commands_in(launcher())]
    for instr, rest in dockerfile():
        if instr in ("RUN", "CMD", "ENTRYPOINT"):  # shell form, or exec form in JSON
            value = json.loads(rest) if rest.startswith("[") else rest
            found += [("Dockerfile", args) for args in value_commands(value)]
    for block in re.findall(r"```bash\n(.*?)```", (DEPLOY / "README.md").read_text(), re.S):
        found += [("README.md", args) for args in superweight_args(block)]
    return found


COMMANDS = all_superweight_commands()


def nightly_crawl() -> dict:
    """The options of the nightly crawl (the scheduled RayJob's entrypoint), as the CLI parses them."""
    assert "crawl" in cli.commands, "`superweight crawl` is not a command of the CLI"
    [args] = superweight_args(one("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]["entrypoint"])
    return cli.commands["crawl"].make_context("crawl", args[1:]).params


def dockerfile_runs() -> str:
    return "\n".join(rest for instr, rest in dockerfile() if instr == "RUN")


def gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Ti|G|T)", quantity).groups()
    return float(number) * {"Gi": 1, "Ti": 1024, "G": 1e9 / 2**30, "T": 1e12 / 2**30}[unit]


def is_cron(schedule: str) -> bool:
    """A standard 5-field cron schedule (numbers, *, ranges, lists and steps)."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]):
        for part in field.split(","):
            m = re.fullmatch(r"(?:\*|(\d+)(?:-(\d+))?)(?:/([1-9]\d*))?", part)
            if not m or any(n is not None and not low <= int(n) <= high for n in m.groups()[:2]):
                return False
    return True


@pytest.mark.parametrize("name", sorted(KINDS))
def test_manifests_have_the_expected_kinds_and_api_versions(name):
    docs = manifests(name)
    assert [doc["kind"] for doc in docs[:len(KINDS[name])]] == KINDS[name]
    for doc in docs:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], f"deploy/{name}: {doc['kind']} {doc['apiVersion']}"


def test_every_yaml_file_in_deploy_is_checked():
    assert {path.name for path in DEPLOY.glob("*.yaml")} == set(KINDS) | {"cluster.yaml"}


def test_the_gpu_worker_group_autoscales_from_zero_and_fits_the_crawl():
    cluster = one("raycluster.yaml", "RayCluster")["spec"]
    head = cluster["headGroupSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert head["rayStartParams"]["num-cpus"] == "0", "scans must not land on the head"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    [group] = cluster["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    crawl = nightly_crawl()
    assert crawl["gpus_per_worker"] == 1, "the crawl must ask for GPUs, or the autoscaler never adds a worker"
    assert crawl["workers"] <= group["maxReplicas"] * gpus, "more scan workers than GPUs the cluster can reach"


def test_ray_version_matches_the_image():
    [pin] = re.findall(r"ray\[default\]==([\d.]+)", dockerfile_runs())
    assert one("raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == pin


def test_the_catalog_is_on_the_heads_volume_and_each_workers_layer_cache_fits_its_memory():
    home = dockerfile_env()["SUPERWEIGHT_HOME"]
    cluster = one("raycluster.yaml", "RayCluster")["spec"]
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head_pod["volumes"]}
    [mount] = [m for m in head_pod["containers"][0]["volumeMounts"] if m["mountPath"] == home]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("raycluster.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in head_pod["containers"][0]["env"]}
    assert env["SUPERWEIGHT_HOME"] == home

    worker_pod = cluster["workerGroupSpecs"][0]["template"]["spec"]
    volumes = {v["name"]: v for v in worker_pod["volumes"]}
    # The driver hands the workers $SUPERWEIGHT_HOME/crawl-cache (index.crawl.CrawlOptions.scratch).
    [mount] = [m for m in worker_pod["containers"][0]["volumeMounts"] if m["mountPath"] == f"{home}/crawl-cache"]
    assert gib(volumes[mount["name"]]["emptyDir"]["sizeLimit"]) >= 1, "no room for a model's config and tokenizer"
    crawl = nightly_crawl()
    assert not crawl["download"], "the nightly crawl streams weights from the Hub"
    memory = gib(worker_pod["containers"][0]["resources"]["limits"]["memory"]) * 2**30
    share = crawl["max_cache_gb"] * 1e9 / crawl["workers"]  # each worker's layer cache (CrawlOptions)
    assert memory >= share + 8 * 2**30, "a worker's share of --max-cache-gb leaves no room for the scan itself"


def test_scheduled_rayjobs_are_the_same_and_select_the_long_lived_cluster():
    cluster_name = one("raycluster.yaml", "RayCluster")["metadata"]["name"]
    template = one("raycronjob.yaml", "RayCronJob")["spec"]["jobTemplate"]
    rayjob = one("cronjob.yaml", "RayJob")["spec"]
    assert rayjob == template, "deploy/cronjob.yaml must create the RayJob of deploy/raycronjob.yaml"
    assert template["clusterSelector"] == {"ray.io/cluster": cluster_name}
    assert "rayClusterSpec" not in template and template["shutdownAfterJobFinishes"] is False
    # Only HTTPMode hands the entrypoint to the head unexpanded, where the Secret's variables are.
    assert template["submissionMode"] == "HTTPMode"
    assert nightly_crawl()["publish_target"], "every night publishes the catalog"


def test_cronjob_runs_nightly_one_at_a_time_with_just_enough_rights():
    cronjob = one("cronjob.yaml", "CronJob")["spec"]
    assert is_cron(cronjob["schedule"]), cronjob["schedule"]
    assert cronjob["schedule"] == one("raycronjob.yaml", "RayCronJob")["spec"]["schedule"]
    assert cronjob["concurrencyPolicy"] == "Forbid" and cronjob["jobTemplate"]["spec"]["backoffLimit"] == 0

    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    account = one("cronjob.yaml", "ServiceAccount")["metadata"]["name"]
    role, binding = one("cronjob.yaml", "Role"), one("cronjob.yaml", "RoleBinding")
    assert pod["serviceAccountName"] == account
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
               for r in role["rules"])

    [volume] = pod["volumes"]
    assert volume["configMap"]["name"] == one("cronjob.yaml", "ConfigMap")["metadata"]["name"]
    [container] = pod["containers"]
    [mount] = container["volumeMounts"]
    assert f"kubectl create -f {mount['mountPath']}/rayjob.yaml" in container["command"][-1]


@pytest.mark.parametrize("schedule, valid", [("0 3 * * *", True), ("*/15 1-5 * * 1,3", True),
                                             ("0 3 * *", False), ("60 3 * * *", False), ("0 3 * * */0", False)])
def test_is_cron(schedule, valid):
    assert is_cron(schedule) is valid


def test_every_secret_reference_is_in_the_example_secret():
    secret = one("secrets.example.yaml", "Secret")
    name, keys = secret["metadata"]["name"], set(secret["stringData"])
    refs = [ref for file in KINDS for doc in manifests(file) for ref in walk(doc, "secretKeyRef")]
    assert refs, "no secretKeyRef found: the cluster reads nothing from the Secret"
    for ref in refs:
        assert ref["name"] == name and ref["key"] in keys, f"{ref} is not in deploy/secrets.example.yaml"
    assert keys == {"SUPERWEIGHT_LEDGER_URL", "HF_TOKEN", "SUPERWEIGHT_PUBLISH_TARGET"}
    literals = re.findall(r"--from-literal=(\w+)=", (DEPLOY / "README.md").read_text())
    assert sorted(literals) == sorted(keys), "the README's `kubectl create secret` must set the same keys"


def test_one_image_everywhere():
    images = set(walk(manifests("raycluster.yaml"), "image"))
    docker = launcher()["docker"]
    images |= {docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    images |= set(re.findall(r"docker build .*-t (\S+)", (DEPLOY / "README.md").read_text()))
    assert len(images) == 1, f"deploy/ names several images: {sorted(images)}"


def test_launcher_config_follows_rays_schema_and_keeps_the_head_free():
    import jsonschema  # the test extra
    import ray  # a dependency of the project

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = launcher()
    jsonschema.validate(config, schema)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0
    assert "--num-cpus=0" in config["head_start_ray_commands"][-1]
    gpu_slots = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert nightly_crawl()["workers"] <= gpu_slots, "more scan workers than GPUs the launcher can start"
    home = dockerfile_env()["SUPERWEIGHT_HOME"]
    assert any(option.endswith(f":{home}") for option in config["docker"]["head_run_options"]), \
        "the head must keep the catalog outside the container"


def test_dockerfile_builds_the_pinned_project_as_a_non_root_user():
    instructions = dockerfile()
    assert instructions[0][1].startswith("python:3.11"), instructions[0]
    [torch] = re.findall(r"torch==([\d.]+)", dockerfile_runs())
    assert f'"torch=={torch}"' in (ROOT / "pyproject.toml").read_text(), "the image must pin pyproject.toml's torch"
    assert [rest for instr, rest in instructions if instr == "USER"][-1] not in ("root", "0")
    assert dockerfile_env()["HF_HUB_DISABLE_TELEMETRY"] == "1"
    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    copied = {rest.split()[0] for instr, rest in instructions if instr == "COPY"}
    assert set(folders) <= copied, f"the image misses the package folders {set(folders) - copied}"
    assert any(instr == "RUN" and "pip install ." in rest for instr, rest in instructions)
    assert not any(secret in rest for _, rest in instructions for secret in ("HF_TOKEN", "LEDGER_URL")), \
        "no secret belongs in the image"


def test_the_crawl_is_in_every_place_that_runs_it():
    assert {"raycronjob.yaml", "cronjob.yaml", "README.md"} <= {f for f, args in COMMANDS if args[:1] == ["crawl"]}


@pytest.mark.parametrize("where, args", COMMANDS, ids=[f"{f}:{' '.join(a[:1])}" for f, a in COMMANDS])
def test_superweight_commands_parse_with_the_real_cli(where, args):
    assert args, f"{where}: `superweight` without a command"
    if args[0].startswith("-"):  # group options such as --version exit while parsing
        with pytest.raises(click.exceptions.Exit):
            cli.make_context("superweight", list(args))
        return
    assert args[0] in cli.commands, f"{where}: `superweight {args[0]}` is not a command"
    try:
        cli.commands[args[0]].make_context(args[0], list(args[1:]))
    except click.UsageError as e:
        pytest.fail(f"{where}: superweight {shlex.join(args)}: {e.format_message()}")


def test_every_file_in_deploy_is_named_in_its_readme():
    readme = (DEPLOY / "README.md").read_text()
    missing = [p.name for p in DEPLOY.iterdir() if p.name != "README.md" and f"`{p.name}`" not in readme]
    assert not missing, f"deploy/README.md does not name {missing}"
