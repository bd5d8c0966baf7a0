"""The plan: a suite and the run's options become jobs, and jobs become a graph of tasks
that any executor (bench.run.executors) can run.

A job is one model (with one λ initialisation) on one data set. Its tasks:
- `train` (one per seed): train or resume that checkpoint;
- `measure` (one per seed): the seed's missing cells and sanity checks; after its `train`;
- `ensemble` (where the suite asks): the seeds' ensemble; after every seed's `train`.
A run of defenses (bench.eval.defenses) has one job per defense, with the suite's first study's
radii, and one task: `defense`, its cells, checks and stability units (seed 0).
The report comes after every task and is the driver's (bench.run.pipeline).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bench.attacks.perturbations import perturbation
from bench.data.datasets import dataset_info
from bench.eval.defenses import DefenseSpec
from bench.eval.landscape import drawn_for
from bench.eval.protocol import EvalConfig
from bench.eval.stability import StabilityConfig
from bench.records.schema import ENSEMBLE_SEED, LandscapeConfig
from bench.run.options import RunOptions
from bench.run.suites import AUTOATTACKS, Study, Suite
from bench.train.recipes import TrainConfig
from models import UserError, model_entry, resolve_models

log = logging.getLogger(__name__)
TRAIN, MEASURE, ENSEMBLE, DEFENSE = "train", "measure", "ensemble", "defense"


@dataclass(frozen=True)
class Job:
    name: str  # the registered model's name; a defense's job: the defense's own name
    dataset: str
    lambda_init: tuple[float, float] | None
    radii_255: tuple[float, ...]
    ensemble_radii_255: tuple[float, ...] = ()
    defense: DefenseSpec | None = None  # a defense's job; None: the zoo's


@dataclass(frozen=True)
class Resources:
    """What one task asks of a worker: Ray schedules by it; memory in GiB of host RAM."""

    gpus: float
    cpus: int
    memory_gib: float


@dataclass(frozen=True)
class Task:
    kind: str  # TRAIN, MEASURE, ENSEMBLE or DEFENSE
    job: Job
    run_tag: str  # the checkpoint tag shared by the job's seeds (the records' `run`)
    seeds: tuple[int, ...]  # one seed; an ensemble's members
    after: tuple[str, ...]  # names of the tasks that must finish first
    resources: Resources
    # the configs, derived once here (plan_tasks) and read by the checks, the estimate, the
    # driver and the workers alike: what is planned, estimated and run cannot differ
    eval: EvalConfig  # the protocol it is measured with (a train task: its seed's)
    stability: StabilityConfig  # the stability stage's (the run's: one for every task)
    train: TrainConfig | None = None  # the checkpoint's: a train or measure task's seed (`checkpoint`)
    landscape: LandscapeConfig | None = None  # Fig. 2's grid, for a seed of a model the figure can show

    @property
    def seed(self) -> int:
        return ENSEMBLE_SEED if self.kind == ENSEMBLE else self.seeds[0]

    @property
    def checkpoint(self) -> TrainConfig:
        """The config of the checkpoint a train or measure task trains or reads."""
        if self.train is None:
            raise ValueError(f"{self.name} has no checkpoint of its own (a {self.kind} task)")
        return self.train

    @property
    def name(self) -> str:
        who = "ensemble" if self.kind == ENSEMBLE else f"seed{self.seeds[0]}"
        if self.kind == DEFENSE:
            return f"{self.kind} {self.job.dataset} {self.run_tag}"
        return f"{self.kind} {self.job.dataset} {self.run_tag} {who}"


def plan_jobs(suite: Suite, options: RunOptions) -> list[Job]:
    """The suite's jobs, restricted to `options.models` when given (models in none of its
    studies get the first study's protocol), with the options' overrides applied."""
    if options.defenses:
        return [defense_job(d, suite, options) for d in options.defenses]
    wanted = resolve_models(options.models) if options.models is not None else None
    if wanted is not None:
        _log_refused(wanted)
        wanted = trainable(wanted, options.models)
    jobs: dict[tuple, Job] = {}
    covered: set[str] = set()
    for study in suite.studies:
        names = resolve_models(study.models)
        if wanted is None:
            _log_refused(names)
        names = [n for n in trainable(names) if wanted is None or n in wanted]
        covered.update(names)
        _add_jobs(jobs, names, study, options)
    if wanted:
        _add_jobs(jobs, [n for n in wanted if n not in covered], suite.studies[0], options)
    if options.lambda_init is not None:
        _check_lambda_init(sorted({j.name for j in jobs.values()}), options.lambda_init)
    for dataset in {j.dataset for j in jobs.values()}:
        dataset_info(dataset)
    return list(jobs.values())


def trainable(names: list[str], asked: str | list[str] | None = None) -> list[str]:
    """`names` without the models the registry marks refused (models.zoo.REFUSED); one
    error line when `asked` (--models) names one itself."""
    literal = {p.strip() for p in (asked.split(",") if isinstance(asked, str) else asked or ())}
    for name in names:
        reason = model_entry(name).refused
        if reason and name in literal:
            raise UserError(
                f"{name} is not trained by the benchmark: {reason} (docs/PROTOCOL.md, Table 4); "
                "leave it out of --models"
            )
    return [n for n in names if not model_entry(n).refused]


def _log_refused(names: list[str]) -> None:
    """One line for each refused model a plan leaves out."""
    for name in dict.fromkeys(n for n in names if model_entry(n).refused):
        log.info("%s left out of the plan: %s (docs/PROTOCOL.md, Table 4)", name, model_entry(name).refused)


def defense_job(defense: DefenseSpec, suite: Suite, options: RunOptions) -> Job:
    """A defense's job: the suite's first study's attack radii (or --radii), on its data set."""
    dataset_info(defense.dataset)
    return Job(
        defense.name,
        defense.dataset,
        None,
        tuple(sorted(options.radii_255 or suite.studies[0].radii_255)),
        defense=defense,
    )


def _check_lambda_init(models: list[str], init: tuple[float, float]) -> None:
    """`--lambda-init` applies to the models with λ; one line when none of them has one, a
    log line naming those it leaves at their own build."""
    without = [m for m in models if not has_lambda(m)]
    shown = f"{init[0]:g},{init[1]:g}"
    if len(without) == len(models):
        raise UserError(
            f"--lambda-init {shown} sets λ's initialisation, and none of the models has a λ "
            f"({', '.join(without)}): leave it out, or choose interpolated models (e.g. in-resnet*)"
        )
    if without:
        log.info(
            "--lambda-init %s applies to the models with a λ; not to %s (no λ)", shown, ", ".join(without)
        )


def has_lambda(model: str) -> bool:
    return model_entry(model).damped_lambda_init is not None


def _add_jobs(jobs: dict[tuple, Job], names: list[str], study: Study, options: RunOptions) -> None:
    radii_255 = options.radii_255 or study.radii_255
    ensemble_255 = (options.radii_255 or study.ensemble_radii_255) if study.ensemble_radii_255 else ()
    for name in names:
        inits: tuple[tuple[float, float] | None, ...]
        if not has_lambda(name):
            inits = (None,)
        elif options.lambda_init:
            inits = (options.lambda_init,)
        else:  # the study's intervals of starting coefficients, as this model's d
            entry = model_entry(name)
            inits = tuple(dict.fromkeys(None if c is None else entry.init_for(c) for c in study.lambda_inits))
        for dataset in options.datasets or study.datasets:
            for init in inits:
                key = (name, dataset, init)
                old = jobs.get(key, Job(name, dataset, init, ()))
                jobs[key] = Job(
                    name,
                    dataset,
                    init,
                    _merged(old.radii_255, radii_255),
                    _merged(old.ensemble_radii_255, ensemble_255),
                )


def _merged(old: tuple[float, ...], new: tuple[float, ...]) -> tuple[float, ...]:
    """Two studies' radii as one sorted tuple; a radius given twice in one (--radii 2,2)
    stays twice, for EvalConfig to refuse."""
    return tuple(sorted((*old, *(e for e in new if e not in old))))


def plan_tasks(jobs: list[Job], suite: Suite, options: RunOptions, device: str) -> list[Task]:
    """The tasks of the asked stages in an order that respects `after` (every training
    first, as one process runs them; executors with more workers start what is ready),
    each with its configs (an option a config refuses: one error line now)."""
    resources = task_resources(suite, device)
    stability = stability_config(suite, options)
    trains, measures = [], []
    if any(job.defense is not None for job in jobs):
        return [
            Task(
                DEFENSE,
                job,
                job.name,
                (0,),
                (),
                resources,
                eval_config(job, suite, options, device),
                stability,
            )
            for job in jobs
        ]
    for job in jobs:
        seeds = job_seeds(job, suite, options)
        evaluated = eval_config(job, suite, options, device)
        made = {s: train_config(job, s, suite, options, device) for s in seeds}
        run = made[seeds[0]].run_tag
        trained = [Task(TRAIN, job, run, (s,), (), resources, evaluated, stability, made[s]) for s in seeds]
        waits = {
            s: (t.name,) if "train" in options.stages else () for s, t in zip(seeds, trained, strict=True)
        }
        trains += trained if "train" in options.stages else []
        if not {"eval", "check", "stability"} & set(options.stages):
            continue
        landscape = landscape_config(options) if drawn_for(job.name) else None
        measures += [
            Task(MEASURE, job, run, (s,), waits[s], resources, evaluated, stability, made[s], landscape)
            for s in seeds
        ]
        if job.ensemble_radii_255 and len(seeds) >= 2:
            measures.append(
                Task(
                    ENSEMBLE,
                    job,
                    run,
                    seeds,
                    sum(waits.values(), ()),
                    resources,
                    eval_config(job, suite, options, device, ensemble=True),
                    stability,
                )
            )
    return trains + measures


def task_resources(suite: Suite, device: str) -> Resources:
    """One GPU per task on a GPU (the suite's models fit one), none on a CPU."""
    gpus = 1.0 if device.startswith("cuda") else 0.0
    return Resources(gpus, suite.task_cpus, suite.task_memory_gib)


def seeds_of(suite: Suite, options: RunOptions) -> tuple[int, ...]:
    return options.seeds if options.seeds is not None else suite.seeds


def job_seeds(job: Job, suite: Suite, options: RunOptions) -> tuple[int, ...]:
    """The seeds a job trains: the run's; in a rehearsal without --seeds, the first one
    alone unless the job evaluates its seeds' ensemble (which needs two)."""
    seeds = seeds_of(suite, options)
    if suite.rehearsal and options.seeds is None and not job.ensemble_radii_255:
        return seeds[:1]
    return seeds


def train_config(job: Job, seed: int, suite: Suite, options: RunOptions, device: str) -> TrainConfig:
    return TrainConfig(
        job.name,
        job.dataset,
        seed,
        options.preset,
        options.length or suite.length,
        job.lambda_init,
        n_train_of(job.dataset, suite, options),
        device,
        options.channels_last,
        options.bf16,
        options.compile,
    )


def n_train_of(dataset: str, suite: Suite, options: RunOptions) -> int | None:
    """--n-train, else the suite's subset where the data set has more training images:
    the smoke suite's 2,048 on a data set of 384 trains on all of them, tagged so (a
    --n-train above the images there are is refused before any work)."""
    if options.n_train is not None:
        return options.n_train
    return (
        suite.n_train
        if suite.n_train is not None and suite.n_train < dataset_info(dataset).sizes[0]
        else None
    )


def eval_config(
    job: Job, suite: Suite, options: RunOptions, device: str, ensemble: bool = False
) -> EvalConfig:
    attack_radii_255 = job.ensemble_radii_255 if ensemble else job.radii_255
    # the suite's further perturbations; ensembles only at their attack radii, except the
    # large-eps gate's attack, at its own: every row can pass its gate
    extra = []
    for name, radii_255 in suite.extra:
        gate = perturbation(name).chance_from_255 is not None
        radii_255 = (
            attack_radii_255
            if radii_255 is None
            else tuple(e for e in radii_255 if not ensemble or gate or e in attack_radii_255)
        )
        extra += [(name, radii_255)] if radii_255 else []
    own = subsets(suite, options)
    if ensemble and (reference := dict(own).get("autoattack")) is not None:  # on the AutoAttack subset
        own += tuple((name, reference) for name, _ in extra if perturbation(name).chance_from_255 is not None)
    return EvalConfig(
        preset=options.preset,
        radii_255=job.radii_255,
        iterative_radii_255=attack_radii_255 if ensemble else None,
        steps=options.steps,
        n_test=n_test_of(suite, options),
        subset_rule=suite.subset_rule,
        noise_source=noise_source_of(suite, options),
        noise_groups=suite.noise_groups,
        batch_size=options.batch_size,
        device=device,
        extra=tuple(extra),
        randomized_extra=suite.randomized_extra,
        subsets=own,
    )


def noise_source_of(suite: Suite, options: RunOptions) -> str:
    """--noise-source, or "released" for a suite that reads only the released files (one
    error line for --noise-source generated there)."""
    if not suite.released_noise:
        return options.noise_source
    if options.noise_source == "generated":
        raise UserError(
            f"--noise-source generated: suite {suite.name} reads the released CIFAR-C files only "
            "(as RobustBench does); leave --noise-source out"
        )
    return "released"


def stability_config(suite: Suite, options: RunOptions) -> StabilityConfig:
    """The stability stage's settings: the suite's image count (capped at the test images
    where it runs) unless `--n-stability`, which may not be more than the test images."""
    n_test = n_test_of(suite, options)
    if options.n_stability is None:
        return StabilityConfig(n=suite.n_stability)
    if n_test is not None and options.n_stability > n_test:
        raise UserError(
            f"--n-stability {options.n_stability}: more than the {n_test} test images it is drawn from: "
            f"give at most {n_test}, or test on more images"
        )
    return StabilityConfig(n=options.n_stability)


def landscape_config(options: RunOptions) -> LandscapeConfig:
    """Fig. 2's grid as the options give it (bench.eval.landscape)."""
    index, points, radius = options.landscape
    return LandscapeConfig(index=index, points=points, radius=radius)


def n_test_of(suite: Suite, options: RunOptions) -> int | None:
    """The test images of every cell: --n-test, else the suite's (None: all of them)."""
    return options.n_test if options.n_test is not None else suite.n_test


def subsets(suite: Suite, options: RunOptions) -> tuple[tuple[str, int], ...]:
    """The suite's smaller test subsets, capped at the test images they are drawn from (the
    plan's header says so), AutoAttack's (each norm's) replaced by `--n-autoattack` (EvalConfig refuses
    one above them: a subset the user gives is never shrunk in silence)."""
    n_test = n_test_of(suite, options)
    own = {name: n if n_test is None else min(n, n_test) for name, n in suite.subsets}
    if options.n_autoattack is not None:
        own |= dict.fromkeys(autoattacks(suite), options.n_autoattack)
    return tuple(own.items())


def autoattacks(suite: Suite) -> tuple[str, ...]:
    """The AutoAttack perturbations `--n-autoattack` sizes: AutoAttack's, and every other
    AutoAttack the suite measures (RobustBench's L2)."""
    measured = dict(suite.extra) | dict(suite.randomized_extra)
    return tuple(n for n in AUTOATTACKS if n == "autoattack" or n in measured)
