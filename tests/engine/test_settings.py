"""One settings reader: every variable parses, defaults are the dataclasses', bad values name the variable, and
no other product module reads the environment."""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backfill.config import EmbedConfig, IndexConfig
from backfill.discovery import DiscoveryBudget
from backfill.errors import ConfigError
from backfill.settings import DEFAULT_MODEL, REPO, VARIABLES, Settings, default, setting

# being moved out of the product to harness/ by another change; tolerated while they are still here
HARNESS = {"ops/chaos.py", "ops/local_s3.py", "ops/local_instance.py"}


def test_no_variables_means_the_dataclass_defaults():
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.embed == EmbedConfig() and settings.index == IndexConfig()
    assert settings.discovery == DiscoveryBudget()
    assert settings.root == str(REPO / "data") and settings.model == DEFAULT_MODEL == "refcnn"


def test_every_engine_field_has_one_variable():
    targets = [v.target for v in VARIABLES]
    assert len(targets) == len(set(targets)) and len({v.name for v in VARIABLES}) == len(VARIABLES)
    for prefix, config in (("embed", EmbedConfig), ("index", IndexConfig), ("discovery", DiscoveryBudget)):
        for field in dataclasses.fields(config):
            assert f"{prefix}.{field.name}" in targets, f"add a line for {config.__name__}.{field.name} to VARIABLES"
    top = {f.name for f in dataclasses.fields(Settings)} - {"embed", "index", "discovery"}
    assert top <= set(targets), "every Settings field is set by a variable"


# a valid value other than the default, where the type's sample is out of range
VALID = {
    "BACKFILL_GPU_DECODER": "nvimgcodec",
    "BACKFILL_S3_ENDPOINT_URL": "https://minio.example.com:9000",
    "BACKFILL_DEPLOYMENT": "k8s",
    "BACKFILL_DEVICE": "cuda:1",
    "BACKFILL_PQ_FROM": 5000, "BACKFILL_WORK_LOG": "/tmp/work.log", "BACKFILL_TRAIN_POINTS_PER_CENTROID": 100,
    "BACKFILL_MAX_NLIST": 1024,
}  # fmt: skip


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda v: v.name)
def test_each_variable_reaches_its_field(variable):
    owner, _, name = variable.target.rpartition(".")
    samples = {int: 7, float: 0.5, bool: False, str: "s3://bucket/x"}
    value = VALID[variable.name] if variable.name in VALID else samples[type(default(variable))]
    settings = Settings.from_env({variable.name: str(value).lower()})
    holder = {"": settings, "embed": settings.embed, "index": settings.index, "discovery": settings.discovery}[owner]
    assert getattr(holder, name) == value


def test_parsing():
    settings = Settings.from_env(
        {
            "BACKFILL_BATCH_SIZE": " 16 ",
            "BACKFILL_GPU_DECODE": "off",
            "BACKFILL_TARGET_RECALL": "0.9",
            "BACKFILL_ROOT": "corpus",
        }
    )
    assert (
        settings.embed.batch_size == 16 and settings.embed.gpu_decode is False and settings.index.target_recall == 0.9
    )
    assert settings.root == str(REPO / "corpus")  # relative: the repository's, as Dagster and the CLI both need
    assert Settings.from_env({"BACKFILL_ROOT": "/abs/root"}).root == "/abs/root"
    assert Settings.from_env({"BACKFILL_ROOT": "s3://b/p"}).root == "s3://b/p"
    assert Settings.from_env({"BACKFILL_BATCH_SIZE": "", "BACKFILL_POOL": "  "}) == Settings()  # empty = unset


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"BACKFILL_BATCH_SIZE": "abc"},
            "environment variable BACKFILL_BATCH_SIZE='abc' is not an integer: "
            "set a valid value or unset it (default 64",
        ),
        (
            {"BACKFILL_BATCH_SIZE": "99999"},
            "environment variable BACKFILL_BATCH_SIZE=99999: batch_size must be in 1..8192",
        ),
        ({"BACKFILL_GRACE_S": "soon"}, "environment variable BACKFILL_GRACE_S='soon' is not a number"),
        (
            {"BACKFILL_GPU_DECODE": "maybe"},
            "environment variable BACKFILL_GPU_DECODE='maybe' is not a boolean (use true or false)",
        ),
        (
            {"BACKFILL_SENSOR_INTERVAL": "0"},
            "environment variable BACKFILL_SENSOR_INTERVAL='0' must be at least 1 second",
        ),
        (
            {"BACKFILL_DEVICE": "tpu"},
            "environment variable BACKFILL_DEVICE='tpu': device must be 'cpu', 'cuda' or 'cuda:N'",
        ),
        (
            {"BACKFILL_DEPLOYMENT": "cloud"},
            "environment variable BACKFILL_DEPLOYMENT='cloud' must be one of local, local-in-process, k8s",
        ),
        (
            {"BACKFILL_S3_ENDPOINT_URL": "minio:9000"},
            "BACKFILL_S3_ENDPOINT_URL='minio:9000' is not a URL; expected e.g. https://",
        ),
        (
            {"BACKFILL_DISCOVERY_MAX_SHARDS": "0"},
            "environment variable BACKFILL_DISCOVERY_MAX_SHARDS=0: DiscoveryBudget.max_shards must be positive",
        ),
        (
            {"BACKFILL_FLAT_BELOW": "100", "BACKFILL_PQ_FROM": "50", "BACKFILL_RECALL_K": "5"},
            "environment variable BACKFILL_FLAT_BELOW=100, BACKFILL_PQ_FROM=50: "
            "pq_from must be greater than flat_below",
        ),
    ],
)
def test_a_bad_value_names_the_variable_and_the_fix(env, message):
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert message in str(err.value)


def test_one_setting_is_read_alone():
    # Store.open needs the endpoint only: a bad batch size must not break storage
    env = {"BACKFILL_BATCH_SIZE": "abc", "BACKFILL_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}
    assert setting("BACKFILL_S3_ENDPOINT_URL", env) == "http://127.0.0.1:9000"
    assert setting("BACKFILL_CACHE_DIR", env) == ""
    assert setting("BACKFILL_MODEL", {}) == DEFAULT_MODEL


def _reads_environment(tree: ast.AST) -> list[int]:
    """Lines that touch os.environ / os.getenv / putenv, however imported."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "putenv", "unsetenv"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if {a.name for a in node.names} & {"environ", "environb", "getenv", "putenv", "unsetenv"}:
                lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
            lines.append(node.lineno)
    return lines


def test_no_product_module_but_settings_reads_the_environment():
    offenders = []
    for folder in ("backfill", "assets", "ops"):
        for path in sorted((REPO / folder).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if name == "backfill/settings.py" or name in HARNESS:
                continue
            for line in _reads_environment(ast.parse(path.read_text(), name)):
                offenders.append(f"{name}:{line}")
    assert offenders == [], "read settings through backfill.settings (add the variable to VARIABLES)"


def test_the_scan_sees_a_read():
    assert _reads_environment(ast.parse("import os\nx = os.environ.get('A')")) == [2]
    assert _reads_environment(ast.parse("from os import getenv\ngetenv('A')")) != []


def test_importing_the_product_parses_no_variable():
    """Every product module imports with every variable malformed: values are read when Settings are built."""
    modules = [
        p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
        for folder in ("backfill", "assets", "ops")
        for p in sorted((REPO / folder).glob("*.py"))
        if p.relative_to(REPO).as_posix() not in HARNESS and p.name != "__init__.py"
    ]
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nprint('imported')"
    env = {**os.environ, **{v.name: "!malformed" for v in VARIABLES}}
    proc = subprocess.run(
        [sys.executable, "-c", code, *modules], check=False, cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "imported", proc.stderr[-2000:]
    with pytest.raises(ConfigError, match="BACKFILL_"):
        Settings.from_env(env)


def test_the_readme_table_lists_every_variable():
    readme = (Path(REPO) / "README.md").read_text()
    missing = [v.name for v in VARIABLES if f"`{v.name}`" not in readme]
    assert missing == [], "document these in README.md's configuration table"


def test_reading_one_setting_loads_no_engine():
    """Store.open and the CLI's defaults read one setting: that must not import torch or faiss (the
    discovery budget's class is imported only when Settings are built)."""
    code = (
        "import sys\nfrom backfill.settings import setting\nsetting('BACKFILL_ROOT'); setting('BACKFILL_POOL')\n"
        "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.strip() == "[]"
