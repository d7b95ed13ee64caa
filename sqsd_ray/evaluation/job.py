"""``sqsd-ray evaluate``: the safety of fine-tuned models (paper App. B): generate, judge, aggregate.

    rows (state × benchmark prompt) -> GenerationActor (greedy, chat template) -> one JudgeActor per judge
    -> responses.parquet, metrics.csv / metrics.json (per state and benchmark: ASR per judge, Safety Score)

With ``generation.engine: vllm`` vLLM engines (``ray.data.llm``, ``vllm_engine``) take the GenerationActor's place:
the same token ids in, the same columns out, so the judges and metrics run unchanged.

A *state* is what to evaluate: ``base`` (θ0), a LoRA adapter directory (a fine-tune checkpoint's
``adapter/``), or a whole fine-tuned model directory (``model/`` of a full fine-tune). On Ray the rows stream
through Ray Data actor pools (generators hold the base model and swap adapters; judges hold their judge model);
without Ray the same actor classes run in this process. Rows are sorted by state so a generator rarely swaps.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import ConfigError, from_dict, help_field, to_dict
from ..models.loading import ModelConfig, with_absolute_paths
from ..models.lora import LoraSettings
from .generate import (EvalSettings, FactorDict, GenerationSettings, StateResult, check_generation,
                       evaluate_states_here, generate_responses, load_eval_prompts, state_kind)
from .judges import JudgeSettings, Verdict, build_judge

log = logging.getLogger(__name__)


@dataclass
class EvalWorkers:
    use_ray: bool = help_field(True, help="false = generate and judge in this process")
    address: str | None = help_field(None, help="Ray address; default RAY_ADDRESS, else a private local Ray")
    generators: int = help_field(1, help="generation actors (each holds the base model)")
    judges: int = help_field(1, help="actors per judge model")
    cpus_per_actor: float = help_field(1.0, help="CPUs per actor")
    gpus_per_actor: float = help_field(0.0, help="GPUs per actor (1 on a GPU cluster)")
    rows_per_call: int = help_field(64, help="rows handed to an actor per call")
    local_num_cpus: int | None = help_field(None, help="local Ray only: CPUs to give it")
    object_store_mb: int = help_field(256, help="local Ray only: object store MiB")
    include_dashboard: bool = help_field(False, help="local Ray only: dashboard on 127.0.0.1")


@dataclass
class EvalJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    states: dict[str, str] = help_field(
        {"base": "base"}, help="name -> 'base', a LoRA adapter dir, or a full fine-tuned model dir"
    )
    benchmarks: list[EvalSettings] = help_field(
        [EvalSettings()], help="prompt sets (benchmark, path, limit, max_new_tokens, ...), CatQA by default"
    )
    judges: dict[str, JudgeSettings] = help_field(
        {"keyword": JudgeSettings()}, help="name -> judge (kind keyword | llamaguard | cost_model, model, ...)"
    )
    workers: EvalWorkers = field(default_factory=EvalWorkers)
    generation: GenerationSettings = help_field(
        default_factory=GenerationSettings, help="engine (hf | vllm) and sampling of the responses",
        identity_if_set=True,
    )
    output_dir: str = help_field("runs/eval", help="run directory")

    def __post_init__(self) -> None:
        if not self.states:
            raise ConfigError("states: name at least one model state to evaluate")
        if not self.benchmarks or not self.judges:
            raise ConfigError("benchmarks and judges must not be empty")
        labels = [b.label for b in self.benchmarks]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"benchmarks: two entries are both labelled {labels}; give each a distinct name")
        check_generation(self.generation, self.model, self.workers.use_ray, "workers")


class GenerationActor:
    """Holds θ0 with a LoRA adapter; per call, generates greedy responses for rows of one or more states."""

    def __init__(self, cfg_dict: dict[str, Any], threads: int | None = None) -> None:
        import torch

        from ..models.loading import load_model_and_tokenizer
        from ..models.lora import apply_lora

        self.cfg = from_dict(EvalJobConfig, cfg_dict)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        base, self.tokenizer = load_model_and_tokenizer(self.cfg.model)
        self.model = apply_lora(base, self.cfg.lora)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.active: str | None = None
        self.full_model = None
        self.settings = benchmarks_by_key(self.cfg)

    def _activate(self, state: str):
        """The module to generate with for ``state`` (adapter swapped in, or a full model loaded)."""
        import torch

        from ..models.loading import load_model
        from ..models.lora import get_lora_scalings, load_adapter_state, set_lora_factors

        spec = self.cfg.states[state]
        kind = state_kind(spec)
        if kind == "full":
            if self.active != state:
                self.full_model = None  # free the previous one first
                self.full_model = load_model(replace(self.cfg.model, name_or_path=spec))
                if torch.cuda.is_available():
                    self.full_model.to("cuda")
                self.active = state
            return self.full_model
        if self.active != state:
            if kind == "adapter":
                factors, info = load_adapter_state(spec)
                # ΔW = s·B·A: an adapter trained with another α/r (or rsLoRA) keeps its ΔW when B is rescaled to
                # this model's scaling s
                ours = get_lora_scalings(self.model)
                factors = {m: (a, b * (info.module_scalings[m] / ours[m])) for m, (a, b) in factors.items()}
                set_lora_factors(self.model, factors)
            self.active, self.full_model = state, None
        return self.model

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import contextlib

        import torch

        from .generate import EvalPrompt

        if self.threads:
            torch.set_num_threads(self.threads)  # Ray Data calls from its own thread
        responses = pd.Series([""] * len(batch), index=batch.index, dtype=object)
        for (state, bench), rows in batch.groupby(["state", "benchmark_key"], sort=False):
            model = self._activate(state)
            settings = self.settings[bench]
            prompts = [EvalPrompt(pid, text) for pid, text in zip(rows["prompt_id"], rows["prompt"])]
            off = self.model.disable_adapter() if self.cfg.states[state] == "base" else contextlib.nullcontext()
            with off:
                out = generate_responses(model, self.tokenizer, prompts, settings.max_new_tokens,
                                         settings.batch_size, settings.system_prompt, self.cfg.generation)
            responses.loc[rows.index] = out
        return batch.assign(response=responses)


class JudgeActor:
    def __init__(self, name: str, settings_dict: dict[str, Any], threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.name, self.threads = name, threads
        self.judge = build_judge(from_dict(JudgeSettings, settings_dict))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        verdicts: list[Verdict] = self.judge.judge(list(zip(batch["prompt"], batch["response"])))
        return batch.assign(**{
            f"{self.name}_status": [v.status for v in verdicts],
            f"{self.name}_categories": [",".join(v.categories) for v in verdicts],
            f"{self.name}_score": [v.score if v.score is not None else float("nan") for v in verdicts],
        })


def _bench_key(bench: EvalSettings) -> str:
    return f"{bench.label}:{bench.path}:{bench.hf_split}"


def benchmarks_by_key(cfg: EvalJobConfig) -> dict[str, EvalSettings]:
    """Each benchmark under the ``benchmark_key`` its rows carry."""
    return {_bench_key(b): b for b in cfg.benchmarks}


def _rows(cfg: EvalJobConfig) -> list[dict[str, Any]]:
    rows = []
    for bench in cfg.benchmarks:
        prompts = load_eval_prompts(bench)
        for state in cfg.states:
            rows += [{"state": state, "benchmark": bench.label, "benchmark_key": _bench_key(bench),
                      "prompt_id": p.prompt_id, "category": p.category, "prompt": p.prompt} for p in prompts]
    return rows


def _resolved(cfg: EvalJobConfig) -> EvalJobConfig:
    """Local paths absolute (actors run elsewhere); every state checked before any model loads."""
    states = {}
    for name, spec in cfg.states.items():
        state_kind(spec)
        states[name] = spec if spec == "base" else str(Path(spec).resolve())
    benchmarks = [replace(b, path=str(Path(b.path).resolve())) if Path(b.path).exists() else b for b in cfg.benchmarks]
    return replace(cfg, model=with_absolute_paths(cfg.model), states=states, benchmarks=benchmarks)


def generate_and_judge(cfg: EvalJobConfig) -> pd.DataFrame:
    cfg = _resolved(cfg)
    rows = sorted(_rows(cfg), key=lambda r: (r["state"], r["benchmark_key"]))
    workers = cfg.workers
    threads = max(1, int(workers.cpus_per_actor))
    if not workers.use_ray:
        frame = GenerationActor(to_dict(cfg))(pd.DataFrame(rows))
        for name, judge in cfg.judges.items():
            frame = JudgeActor(name, to_dict(judge))(frame)
        return frame
    import ray.data

    from ..runtime import init_ray

    init_ray(workers)
    common = dict(batch_format="pandas", batch_size=workers.rows_per_call, num_cpus=workers.cpus_per_actor,
                  num_gpus=workers.gpus_per_actor)
    if cfg.generation.engine == "vllm":
        from .vllm_engine import generate_on_vllm

        ds = generate_on_vllm(cfg.model, cfg.states, benchmarks_by_key(cfg), rows, cfg.generation)
    else:
        n_blocks = max(1, -(-len(rows) // workers.rows_per_call))
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        ds = ds.map_batches(GenerationActor, fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "threads": threads},
                            compute=ray.data.ActorPoolStrategy(size=workers.generators), **common)
    for name, judge in cfg.judges.items():
        # the keyword judge is string matching: it never holds a GPU
        judge_resources = {**common, "num_gpus": 0 if judge.kind == "keyword" else workers.gpus_per_actor}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(JudgeActor, fn_constructor_kwargs={"name": name, "settings_dict": to_dict(judge),
                                                                   "threads": threads},
                                compute=ray.data.ActorPoolStrategy(size=workers.judges), **judge_resources)
    return ds.to_pandas()


def metrics_table(frame: pd.DataFrame, judges: dict[str, JudgeSettings]) -> pd.DataFrame:
    """Per state and benchmark: n, and per judge the ASR (%, over parsed verdicts), unparsed count, or the
    Safety Score (mean −cost)."""
    out = []
    for (state, bench), rows in frame.groupby(["state", "benchmark"], sort=True):
        row: dict[str, Any] = {"state": state, "benchmark": bench, "n": len(rows)}
        for name, judge in judges.items():
            status = rows[f"{name}_status"]
            if judge.kind == "cost_model":
                row[f"{name}_safety_score"] = float(rows[f"{name}_score"].mean())
            else:
                parsed = status[status.isin(["safe", "unsafe"])]
                row[f"{name}_asr"] = 100.0 * float((parsed == "unsafe").mean()) if len(parsed) else float("nan")
                row[f"{name}_unparsed"] = int((status == "unparsed").sum())
        out.append(row)
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------ judging


def state_safety(metrics: Mapping[str, float], name: str, judge: JudgeSettings) -> tuple[float, float]:
    """(ASR, safety) of one state by judge ``name`` from its ``metrics_table`` row: an ASR judge gives
    safety = 100 − ASR (%), a cost model its Safety Score (mean −cost, Eq. 15) and no ASR (NaN)."""
    if judge.kind == "cost_model":
        return float("nan"), float(metrics[f"{name}_safety_score"])
    asr = float(metrics[f"{name}_asr"])  # NaN when no verdict could be parsed
    return asr, 100.0 - asr


def judge_responses_here(frame: Any, name: str, settings: dict[str, Any], torch_threads: int | None = None) -> Any:
    """``frame`` (prompt, response columns) with judge ``name``'s verdict columns, by ``evaluate``'s
    ``JudgeActor`` in this process (it builds the judge, loading its model, once)."""
    import torch

    previous_threads = torch.get_num_threads()
    try:
        return JudgeActor(name, settings, torch_threads)(frame)
    finally:
        torch.set_num_threads(previous_threads)


def evaluate_states(
    model_cfg: Any, lora: Any, states: Mapping[str, FactorDict | None], eval_cfg: EvalSettings, scaling: Any,
    generation: GenerationSettings | None = None, adapter_root: str | Path | None = None,
) -> list[StateResult]:
    """Generate for named LoRA states of one base model, scored by the keyword judge; with ``scaling.use_ray`` the
    states are split over ``scaling.num_workers`` Ray tasks (each loads the model once). Results keep the order of
    ``states``. ``judge_states`` judges them with ``evaluate``'s judges.

    With ``generation.engine: vllm`` the states become peft adapter dirs under ``adapter_root`` (a folder the
    engines can read: shared storage on a cluster; removed afterwards) served by vLLM engines
    (``vllm_engine.evaluate_states_on_vllm``)."""
    prompts = load_eval_prompts(eval_cfg)
    if generation is not None and generation.engine == "vllm":
        from .vllm_engine import evaluate_states_on_vllm

        return evaluate_states_on_vllm(model_cfg, lora, states, eval_cfg, prompts, scaling, generation, adapter_root)
    names = list(states)
    workers = min(scaling.num_workers, len(names)) if scaling.use_ray else 1
    if not scaling.use_ray:
        return evaluate_states_here(model_cfg, lora, states, eval_cfg, prompts, scaling.torch_threads, generation)
    from ..models.loading import with_absolute_paths
    from ..runtime import init_ray

    model_cfg = with_absolute_paths(model_cfg)
    ray = init_ray(scaling)
    task = ray.remote(evaluate_states_here).options(
        num_cpus=scaling.cpus_per_worker, num_gpus=1 if scaling.use_gpu else 0, max_retries=2,
    )
    threads = scaling.torch_threads or max(1, int(scaling.cpus_per_worker))
    chunks = [names[k::workers] for k in range(workers)]
    refs = [task.remote(model_cfg, lora, {n: states[n] for n in chunk}, eval_cfg, prompts, threads, generation)
            for chunk in chunks if chunk]
    by_name = {r.name: r for part in ray.get(refs) for r in part}
    return [by_name[n] for n in names]


def judge_states(
    results: Sequence[StateResult], judges: Mapping[str, JudgeSettings], safety_judge: str | None = None,
    scaling: Any = None, benchmark: str = "eval",
) -> list[StateResult]:
    """Judge every response of ``results`` with each of ``judges`` and summarise per state, through the code of
    ``evaluate`` (``job.JudgeActor`` -> ``judges.build_judge``; ``job.metrics_table``).

    Each state gets ``metrics`` (every judge's ``<name>_asr`` and ``<name>_unparsed``, or
    ``<name>_safety_score``), ``asr`` / ``safety`` from ``safety_judge`` (default: the first judge, see
    ``state_safety``), and each response its verdicts (``<name>_status``, ``<name>_categories``,
    ``<name>_score``). A judge model loads once per job in this process, or, with ``scaling.use_ray``, once in
    each of up to ``scaling.num_workers`` Ray tasks that share the responses (one GPU each with
    ``scaling.use_gpu``). The keyword judge is string matching: it always runs here.
    """
    import pandas as pd

    if not judges:
        raise ConfigError("judges: name at least one judge (e.g. keyword: {kind: keyword})")
    safety_judge = safety_judge or next(iter(judges))
    if safety_judge not in judges:
        raise ConfigError(f"safety_judge {safety_judge!r} is not one of the judges {list(judges)}")
    rows = [row for result in results for row in result.responses]
    frame = pd.DataFrame({"state": [r["state"] for r in rows], "benchmark": benchmark,
                          "prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]})
    on_ray = {n: j for n, j in judges.items() if scaling is not None and scaling.use_ray and j.kind != "keyword"}
    pending = _judge_on_ray(frame[["prompt", "response"]], on_ray, scaling) if on_ray else {}
    threads = scaling.torch_threads if scaling is not None else None
    for name, judge in judges.items():
        judged = pending[name]() if name in on_ray else judge_responses_here(frame, name, to_dict(judge), threads)
        frame = frame.assign(**{c: judged[c].to_numpy() for c in judged.columns if c not in frame.columns})
    by_state = {row["state"]: row for row in metrics_table(frame, dict(judges)).to_dict("records")}
    verdict_columns = [c for c in frame.columns if c not in ("state", "benchmark", "prompt", "response")]
    verdicts = frame[verdict_columns].astype(object).where(frame[verdict_columns].notna(), None).to_dict("records")
    out, start = [], 0
    for result in results:
        summary = by_state[result.name]
        metrics = {k: v for k, v in summary.items() if k not in ("state", "benchmark", "n")}
        asr, safety = state_safety(metrics, safety_judge, judges[safety_judge])
        if judges[safety_judge].kind == "keyword":  # score_responses' own figures: the same to the last bit
            asr, safety = result.asr, result.safety
        responses = [{**row, **verdict} for row, verdict in
                     zip(result.responses, verdicts[start:start + len(result.responses)])]
        start += len(result.responses)
        log.info("state %s: %s %s %.2f (%d prompts)", result.name, safety_judge,
                 "Safety Score" if judges[safety_judge].kind == "cost_model" else "ASR %",
                 safety if judges[safety_judge].kind == "cost_model" else asr, result.n)
        out.append(StateResult(result.name, asr, safety, result.n, responses, safety_judge, metrics))
    return out


def _judge_on_ray(frame: Any, judges: Mapping[str, JudgeSettings], scaling: Any) -> dict[str, Any]:
    """Start every judge's Ray tasks at once; name -> a call that waits for that judge's verdict frame."""
    import numpy as np
    import pandas as pd

    from ..runtime import init_ray

    ray = init_ray(scaling)
    task = ray.remote(judge_responses_here).options(
        num_cpus=scaling.cpus_per_worker, num_gpus=1 if scaling.use_gpu else 0, max_retries=2,
    )
    threads = scaling.torch_threads or max(1, int(scaling.cpus_per_worker))
    chunks = np.array_split(np.arange(len(frame)), max(1, min(scaling.num_workers, len(frame))))
    parts = [ray.put(frame.iloc[rows]) for rows in chunks]  # each part is shared by every judge
    refs = {name: [task.remote(part, name, to_dict(judge), threads) for part in parts]
            for name, judge in judges.items()}
    return {name: (lambda r=r: pd.concat(ray.get(r))) for name, r in refs.items()}


def run_evaluate(cfg: EvalJobConfig) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = generate_and_judge(cfg)
    frame = frame.drop(columns=["benchmark_key"]).sort_values(["state", "benchmark", "prompt_id"])
    frame.to_parquet(out / "responses.parquet", index=False)
    metrics = metrics_table(frame, cfg.judges)
    metrics.to_csv(out / "metrics.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics.to_dict("records"), indent=1))
    log.info("evaluation:\n%s", metrics.to_string(index=False))
    return out


__all__ = ["EvalJobConfig", "EvalWorkers", "GenerationActor", "JudgeActor", "benchmarks_by_key", "evaluate_states",
           "generate_and_judge", "metrics_table", "run_evaluate"]
