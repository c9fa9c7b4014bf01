import dataclasses

import pytest

from llama3hp.config import (
    ConfigError,
    JobConfig,
    build_job_config,
    coerce,
    job_from_dict,
    job_to_dict,
    load_job_config,
    model_args_from_dict,
    valid_keys,
)


def test_builtin_tiny_loads_with_types():
    job = load_job_config("tiny")
    assert isinstance(job, JobConfig)
    assert job.model_preset == "tiny" and job.model.dim == 256
    assert job.data.datasets == ["@stdlib"]
    assert isinstance(job.training.lr, float) and job.training.steps > 0
    assert job.training.grad_accum_steps() == job.training.global_batch_rows // job.training.micro_batch_rows


def test_overrides_parse_to_field_types():
    job = load_job_config(
        "tiny",
        [
            "training.lr=1e-3",
            "training.steps=12",
            "training.warmup_steps=2",  # the tiny config warms up over 20 steps
            "training.global_batch_rows=8",
            "model.n_layers=2",
            "model.kernels.rmsnorm=torch",
            "model.ffn_dim_multiplier=none",
            "model.tie_embeddings=true",
            "metrics.profile_steps=[2, 4]",
            "training.betas=0.8,0.9",
            "training.batch_ramp=[[0, 4], [1000, 8]]",
            'data.datasets=["a:0.5", "b"]',
            "training.init_from=/x/y",
        ],
    )
    t = job.training
    assert t.lr == 1e-3 and t.steps == 12 and t.grad_accum_steps() == 4
    assert job.model.n_layers == 2 and job.model.kernels.rmsnorm == "torch"
    assert job.model.ffn_dim_multiplier is None and job.model.tie_embeddings is True
    assert job.metrics.profile_steps == [2, 4] and t.betas == [0.8, 0.9]
    assert t.batch_ramp == [[0, 4], [1000, 8]] and job.data.datasets == ["a:0.5", "b"]
    assert t.init_from == "/x/y"


def test_preset_is_applied_before_field_overrides():
    job = build_job_config([("model.n_layers", 3), ("model.preset", "llama3_8b")])
    assert job.model_preset == "llama3_8b" and job.model.dim == 4096 and job.model.n_layers == 3


def test_toml_file_and_roundtrip(tmp_path):
    f = tmp_path / "job.toml"
    f.write_text(
        'name = "x"\n[model]\npreset = "tiny"\nn_layers = 1\n[training]\nsteps = 5\nwarmup_steps = 1\n'
    )
    job = load_job_config(str(f), ["training.seq_len=64"])
    assert job.name == "x" and job.model.n_layers == 1 and job.training.seq_len == 64
    again = job_from_dict(job_to_dict(job))
    assert dataclasses.asdict(again) == dataclasses.asdict(job) and again.model_preset == "tiny"
    assert model_args_from_dict(dataclasses.asdict(job.model)) == job.model


@pytest.mark.parametrize(
    "override, message",
    [
        ("traning.lr=1", "unknown config key 'traning.lr'; did you mean 'training.lr'?"),
        ("model.n_layer=2", "did you mean 'model.n_layers'?"),
        ("model.kernels.rmsnrm=torch", "did you mean 'model.kernels.rmsnorm'?"),
        ("training.steps=abc", "bad value 'abc' for 'training.steps': expected int"),
        ("training.lr=fast", "expected float"),
        ("training.steps=1.5", "expected int"),
        ("metrics.jsonl=maybe", "expected bool"),
        ('training.betas=[0.9, "x"]', "expected list[float]"),
        ("model.kernels=torch", "is a section"),
        ("model.preset=llama9", "unknown model preset 'llama9'"),
        ("training.global_batch_rows=3", "not divisible by micro_batch_rows"),
        ("training.warmup_steps=100000", "warmup_steps"),
        ("training.device=tpu", "training.device must be one of"),
        ("model.kernels.attention=cuda", "unknown kernel backend"),
        ("training.seq_len=100000", "exceeds model.max_seq_len"),
        ("nonsense", "write key=value"),
        (
            "training.activation_checkpointing=selective",
            "training.activation_checkpointing must be one of none, full",
        ),
        ("training.activation_checkpointing_every=0", "activation_checkpointing_every must be >= 1"),
    ],
)
def test_bad_overrides_give_one_clear_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_job_config("tiny", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_activation_checkpointing_is_refused_with_transformer_engine():
    with pytest.raises(
        ConfigError, match="not supported with Transformer Engine recipes; use fp8.recipe=rowwise"
    ):
        load_job_config("tiny", ["fp8.recipe=te_delayed", "training.activation_checkpointing=full"])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_job_config(str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="no config named 'tinny'.*did you mean 'tiny'"):
        load_job_config("tinny")
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 1\n")
    with pytest.raises(ConfigError, match="bad TOML"):
        load_job_config(str(bad))


def test_coerce_rules():
    assert coerce("1e6", int, "k") == 1_000_000
    assert coerce(3, float, "k") == 3.0 and isinstance(coerce(3, float, "k"), float)
    assert coerce("None", int | None, "k") is None
    assert coerce("7", int | None, "k") == 7
    with pytest.raises(ConfigError):
        coerce(True, int, "k")
    assert "training.lr" in valid_keys(JobConfig()) and "model.kernels.swiglu" in valid_keys(JobConfig())


@pytest.mark.parametrize("name", ["tiny", "llama3_1b", "llama3_8b", "llama3_70b", "llama3_405b"])
def test_every_builtin_config_is_valid(name):
    job = load_job_config(name)
    assert job.name == name and job.model_preset in (name, "tiny")


def test_405b_recipe_ramps_batch_and_context():
    from llama3hp.train.schedules import batch_rows_at, seq_len_at

    t = load_job_config("llama3_405b").training
    tokens = [0, 252_000_000, 2_870_000_000_000, 15_466_000_000_000]
    assert [
        batch_rows_at(t.batch_ramp, x, t.global_batch_rows) * seq_len_at(t.seq_len_stages, x, t.seq_len)
        for x in tokens
    ] == [4 * 2**20, 8 * 2**20, 16 * 2**20, 16 * 2**20]


@pytest.mark.parametrize(
    "name, world, layout",
    [
        ("llama3_8b", 8, (1, 1, 1, 8)),
        ("llama3_70b", 64, (8, 1, 1, 8)),
        ("llama3_405b", 8192, (8, 1, 16, 64)),
        ("llama3_405b_8k", 8192, (8, 1, 16, 64)),
        ("llama3_405b_128k", 8192, (8, 16, 16, 4)),
    ],
)
def test_cluster_configs_carry_layouts_valid_for_their_world(name, world, layout):
    from llama3hp.config import validate
    from llama3hp.parallel import resolve_dims, validate_layout
    from llama3hp.parallel.parallelize import check_schedule
    from llama3hp.parallel.plan import plan

    job = load_job_config(name)
    cfg, t = job.parallel, job.training
    dims = resolve_dims(cfg, world)
    assert (dims.tp, dims.cp, dims.pp, dims.dp) == layout and dims.world_size == world
    validate(job, dp_size=dims.dp)  # every batch-ramp entry splits over the data-parallel ranks
    validate_layout(cfg, dims, job.model, t.seq_len)
    if dims.pp > 1:
        check_schedule(cfg.pp_schedule, dims.pp, cfg.pp_virtual_stages, t.grad_accum_steps(None, dims.dp))
    if cfg.dp != -1 or dims.tp * dims.cp * dims.pp > 1:
        with pytest.raises(ValueError, match="world size"):  # one rank more does not fit the layout
            resolve_dims(cfg, world + 1)
    # The step-time model's memory, with the config's activation checkpointing, fits an 80 GiB H100
    # with room for what it does not count (allocator slack, communication and loss-chunk buffers).
    r = plan(
        job.model_preset, dims.tp, dims.cp, dims.pp, dims.dp, t.seq_len, t.global_batch_rows,
        micro_rows=t.micro_batch_rows, virtual=cfg.pp_virtual_stages, zero_stage=cfg.zero_stage,
        checkpointing=t.activation_checkpointing, checkpoint_every=t.activation_checkpointing_every,
        zero3_gather_dtype=cfg.zero3_gather_dtype,
    )  # fmt: skip
    assert r.mem_total_gib <= 72, (name, r.mem_total_gib)


def test_405b_128k_on_the_papers_16384_gpus_needs_dp8():
    from llama3hp.parallel import resolve_dims

    job = load_job_config("llama3_405b_128k", ["parallel.dp=8"])
    assert resolve_dims(job.parallel, 16384).dp == 8
    with pytest.raises(ValueError, match="16384"):
        resolve_dims(load_job_config("llama3_405b_128k").parallel, 16384)
