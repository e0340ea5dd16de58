"""A benchmark task as a YAML file, and its samples.

    name: videomme-tiny
    data: videomme.jsonl            # JSON lines, relative to this file
    media_root: videos/             # media paths are relative to this (default: the data file's folder)
    answer: mc_generate             # mc_generate | mc_loglikelihood | exact_match | yes_no | caption
    parser: videomme                # mc_generate: videomme | mvbench (answers.py: lmms-eval's letter parsing)
    prompt: "Select the best answer ...\\n{question}\\n{options}\\nThe best answer is:"
    option_format: "{letter}. {option}"   # each option in {options}, one per line
    fields: {id: question_id, question: question, options: options, answer: answer, video: videoID}
    frames: 8
    max_new_tokens: 16

What it follows: lmms-eval's task YAMLs (``lmms_eval/tasks/*/*.yaml``: ``dataset_path``, ``doc_to_visual``,
``doc_to_text`` with a ``pre_prompt`` / ``post_prompt``, ``doc_to_target``, ``process_results``), with the
Python hooks replaced by data: the prompt is a ``str.format`` template over the sample's fields (plus
``{options}``, the options written with ``option_format`` and joined by newlines, and ``{letters}``, "A, B,
C"), the visual is a field holding a path, the target a field, and the judging one of these answer types:

- ``mc_generate``: generate greedily, parse a letter (``parser``), correct when it is the gold letter;
- ``mc_loglikelihood``: score each candidate (the options' texts, or with ``candidates: letters`` the
  letters) after the prompt (score.py, lm-eval's ``multiple_choice`` output type); the prediction is the
  highest by ``rank_by`` (``logprob``: lm-eval's acc; ``per_char``: its acc_norm; ``per_token``, ``per_byte``);
- ``exact_match``: generate, compare with the gold answer(s) (``ignore_case``, ``ignore_punctuation``);
- ``caption``: generate, keep the prediction and the reference captions (the ``answer`` field: one text or a
  list); the summary carries the corpus metrics of captions.py (``caption_metrics``, ``caption_tokenizer``,
  ``caption_bootstrap``): BLEU-1..4, METEOR, ROUGE-L, CIDEr as lmms-eval's COCO caption task computes them;
- ``yes_no``: generate, read yes / no / other as lmms-eval's MME does (answers.yes_no), correct when it is the
  gold; ``score: mme`` adds MME's own score (answers.mme_scores) over the ``meta_fields`` category and question_id.

An image stored in the data as bytes (an HF ``Image`` column: {"bytes", "path"}) is written once to a file
under the temporary folder, named by its hash; ``question_remove`` deletes texts from the stripped question;
``prompt_without`` gives the prompt of a record whose field is missing (None, NaN, "nan": MMBench's hint).

Official data files keep a benchmark's own schema: ``video_path`` / ``image_path`` build the media path from
the record (``"data/{videoID}.mp4"``: Video-MME names its videos by id), ``option_fields`` reads the options
from several fields (NExT-QA's ``a0`` ... ``a4``; ``skip_options`` drops placeholders such as LongVideoBench's
"N/A"; ``option_letters`` says the options are written inside the question, as MLVU's are, and gives their
letters), and a data file may also be one JSON array (``.json``,
MVBench's ``json/*.json``). The bundled task files of the published benchmarks are in ``llava_next/eval/benchmarks/``
(``bundled_task``; docs/evaluation.md says where each data file comes from).

The gold of a multiple-choice sample may be a letter ("B"), an index (1 or "1") or the option's text. Every
unknown key, missing field or bad value is a ``TaskError`` naming the file, the key or the line.
Data: a JSON lines file, a parquet file (``.parquet``) or a folder written by ``datasets``' ``save_to_disk``
(Arrow stream files listed in its state.json; a DatasetDict folder with ``split:``), the last two read with
pyarrow (an optional dependency: ``pip install pyarrow``), without the ``datasets`` library.
"""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from .captions import METRICS, TOKENIZERS

AnswerType = Literal["mc_generate", "mc_loglikelihood", "exact_match", "yes_no", "caption"]
ANSWER_TYPES = ("mc_generate", "mc_loglikelihood", "exact_match", "yes_no", "caption")
RANKS = ("logprob", "per_token", "per_char", "per_byte")
FIELDS = {"id": "id", "question": "question", "options": "options", "answer": "answer", "video": "video",
          "image": "image"}


class TaskError(ValueError):
    """The task file or its data is unusable; the message names the file, key or line and what to write."""


@dataclass(frozen=True)
class Task:
    name: str
    data: Path
    media_root: Path
    answer: AnswerType
    prompt: str = "{question}"
    parser: str = "videomme"
    option_format: str = "{letter}. {option}"
    fields: dict = field(default_factory=lambda: dict(FIELDS))
    frames: int = 8
    max_new_tokens: int = 16
    candidates: Literal["options", "letters"] = "options"
    rank_by: str = "logprob"
    target_delimiter: str = " "
    ignore_case: bool = True
    ignore_punctuation: bool = False
    template: str | None = None
    system: str | None = None
    split: str | None = None  # an HF DatasetDict folder: which split
    video_path: str | list | None = None  # the video's path as a template over the record ("data/{videoID}.mp4");
    # a list: the first template whose file exists (ActivityNet-QA's videos are .mp4, .webm or .mkv)
    image_path: str | None = None  # likewise for an image
    option_fields: list | None = None  # the options as several fields (["a0", "a1", ...]), instead of fields.options
    skip_options: list = field(default_factory=list)  # option texts that mean "no option" (LongVideoBench's "N/A")
    option_letters: list | None = None  # the options are written inside the question (MLVU): their letters only
    meta_fields: list = field(default_factory=list)  # fields kept on each sample for a benchmark's own score (MME)
    prompt_without: dict = field(default_factory=dict)  # {field: template} where the field is empty (MMBench's hint)
    subtitles: dict | None = None  # {path: "subtitle/{videoID}.srt", frames: 32}: {subtitles} (Video-MME's)
    interleaved_subtitles: dict | None = None  # {path: "../subtitles/{subtitle_path}", frames: 16}: LongVideoBench's
    # frames as images and {interleaved}, their "<image>" and the subtitle lines in time order (subtitles.py)
    question_remove: list = field(default_factory=list)  # texts deleted from the stripped question (MME's)
    question_capitalize: bool = False  # the question through str.capitalize (ActivityNet-QA's doc_to_text)
    caption_metrics: list = field(default_factory=lambda: list(METRICS))  # caption: which corpus metrics (captions.py)
    caption_tokenizer: str = "ptb"  # caption: ptb (pycocoevalcap's, Java; lmms-eval's) | python (captions.py)
    caption_bootstrap: int = 100  # caption: resamples for each corpus metric's 95% interval (0: none)
    score: str | None = None  # a benchmark's own score in the summary besides accuracy: "mme" (answers.mme_scores),
    # "mlvu" (answers.mlvu_scores: the mean of the per-category accuracies), "mmbench_circular"
    # (answers.mmbench_circular)
    source: Path | None = None  # the YAML file

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


@dataclass
class Sample:
    """One question of a task, ready to prepare: the prompt text, media paths, options and gold answer."""

    id: str
    prompt: str
    images: list[str]
    videos: list[str]
    options: list[str]  # multiple choice: the option texts; else empty
    gold: Any  # multiple choice: the gold index; exact match: the list of accepted answers
    letters: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # the task's meta_fields of the record (MME: category, question_id)

    @property
    def gold_letter(self) -> str:
        return self.letters[self.gold]


def load_task(path: str | Path, *, data: str | Path | None = None, media_root: str | Path | None = None) -> Task:
    """The task of a YAML file, or of a bundled task by name ("videomme"); relative paths are relative to the
    file's folder. ``data`` / ``media_root`` replace the file's (where the user keeps the official files)."""
    import yaml

    path = Path(path)
    if not path.is_file() and str(path) in bundled_tasks():
        path = bundled_tasks()[str(path)]
    if not path.is_file():
        raise TaskError(f"--task {path}: no such file or bundled task; give a task YAML file or one of "
                        f"{', '.join(bundled_tasks())} (docs/evaluation.md)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must be a mapping of keys (name, data, answer, prompt, ...)")
    known = {f.name for f in dataclasses.fields(Task)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TaskError(f"{path}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(known))}")
    for key in ("data", "answer"):
        if key not in raw:
            raise TaskError(f"{path}: \"{key}\" is missing")
    if raw["answer"] not in ANSWER_TYPES:
        raise TaskError(f"{path}: answer must be one of {', '.join(ANSWER_TYPES)}, got {raw['answer']!r}")
    data = Path(data).resolve() if data is not None else (path.parent / str(raw["data"])).resolve()
    root = raw.get("media_root")
    media_root = Path(media_root).resolve() if media_root is not None else \
        (path.parent / str(root)).resolve() if root is not None else data.parent
    fields = dict(FIELDS)
    fields.update(raw.get("fields") or {})
    task = Task(**{**raw, "name": str(raw.get("name") or path.stem), "data": data, "media_root": media_root,
                   "fields": fields, "source": path.resolve()})
    _check(task, path)
    return task


def _check(task: Task, path: Path) -> None:
    from .answers import PARSERS

    for key in ("video_path", "image_path"):
        value = getattr(task, key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and value
                                                                 and all(isinstance(v, str) for v in value))):
            raise TaskError(f"{path}: {key} must be a template (\"data/{{videoID}}.mp4\") or a list of them, "
                            f"got {value!r}")
    if task.option_fields is not None and (not isinstance(task.option_fields, list) or not task.option_fields
                                           or not all(isinstance(f, str) for f in task.option_fields)):
        raise TaskError(f"{path}: option_fields must be a list of field names, got {task.option_fields!r}")
    letters = task.option_letters
    if letters is not None and (not isinstance(letters, list) or not letters
                                or letters != list(string.ascii_uppercase[:len(letters)])):
        raise TaskError(f"{path}: option_letters must be the letters from A in order ([A, B, C, D]), "
                        f"got {task.option_letters!r}")
    for key in ("subtitles", "interleaved_subtitles"):
        spec = getattr(task, key)
        if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("path"), str)):
            raise TaskError(f"{path}: {key} must be a mapping with path (a template: \"subtitle/{{videoID}}.srt\") "
                            f"and frames, got {spec!r}")
    needs = {"mme": {"category", "question_id"}, "mlvu": {"task_type"}, "mmbench_circular": {"index", "category"}}
    if task.score is not None and not needs.get(task.score, {"-"}) <= set(task.meta_fields):
        raise TaskError(f"{path}: score must be \"mme\" (with meta_fields [category, question_id]), \"mlvu\" (with "
                        f"meta_fields [task_type]), \"mmbench_circular\" (with meta_fields [index, category]) or "
                        f"left out, got {task.score!r}")
    if task.answer == "mc_generate" and task.parser not in PARSERS:
        raise TaskError(f"{path}: parser must be one of {', '.join(PARSERS)}, got {task.parser!r}")
    if task.rank_by not in RANKS:
        raise TaskError(f"{path}: rank_by must be one of {', '.join(RANKS)}, got {task.rank_by!r}")
    if task.candidates not in ("options", "letters"):
        raise TaskError(f"{path}: candidates must be \"options\" or \"letters\", got {task.candidates!r}")
    _check_caption(task, path)
    for key in ("question_capitalize", "ignore_case", "ignore_punctuation"):
        if not isinstance(getattr(task, key), bool):
            raise TaskError(f"{path}: {key} must be true or false, got {getattr(task, key)!r}")
    for key in ("frames", "max_new_tokens"):
        value = getattr(task, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TaskError(f"{path}: {key} must be an integer >= 1, got {value!r}")


def _check_caption(task: Task, path: Path) -> None:
    metrics = task.caption_metrics
    if not isinstance(metrics, list) or not metrics or not set(metrics) <= set(METRICS):
        raise TaskError(f"{path}: caption_metrics must be a list of {', '.join(METRICS)}, got {metrics!r}")
    if task.caption_tokenizer not in TOKENIZERS:
        raise TaskError(f"{path}: caption_tokenizer must be one of {', '.join(TOKENIZERS)}, "
                        f"got {task.caption_tokenizer!r}")
    value = task.caption_bootstrap
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TaskError(f"{path}: caption_bootstrap must be an integer >= 0, got {value!r}")


def read_samples(task: Task) -> list[Sample]:
    """Every sample of the task's data, in order (ids must be unique)."""
    samples, seen = [], {}
    for where, doc in read_docs(task):
        if not isinstance(doc, dict):
            raise TaskError(f"{where}: each line must be one JSON object")
        sample = make_sample(task, doc, where)
        if sample.id in seen:
            raise TaskError(f"{where}: id {sample.id!r} is already used ({seen[sample.id]}); ids key the results, "
                            f"so they must be unique")
        seen[sample.id] = where
        samples.append(sample)
    return samples


def read_docs(task: Task) -> Iterator[tuple[str, Any]]:
    """(where, record) of each row of the data: JSON lines ("FILE line N"), a parquet file or an HF datasets
    folder ("FILE row N", 1-based)."""
    data = task.data
    if data.is_dir():
        yield from _rows(data, _datasets_folder(data, task.split))
    elif not data.is_file():
        raise TaskError(f"task {task.name}: data {data} does not exist")
    elif data.suffix == ".parquet":
        yield from _rows(data, [_arrow().parquet.read_table(data)])
    elif data.suffix == ".json":
        try:
            records = json.loads(data.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskError(f"{data}: not JSON ({e})") from None
        if not isinstance(records, list):
            raise TaskError(f"{data}: a .json data file must be one JSON array of records (or use JSON lines)")
        for number, record in enumerate(records, 1):
            yield f"{data} item {number}", record
    else:
        with open(data, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{data} line {number}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{data} line {number}: not JSON ({e})") from None


def _arrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (pyarrow.parquet is a submodule to import)
    except ImportError:
        raise TaskError("reading parquet files and HF datasets folders needs pyarrow: pip install pyarrow "
                        "(or convert the data to JSON lines)") from None
    return pyarrow


def _rows(path: Path, tables: list) -> Iterator[tuple[str, Any]]:
    n = 0
    for table in tables:
        for row in table.to_pylist():
            n += 1
            yield f"{path} row {n}", row


def _datasets_folder(folder: Path, split: str | None) -> list:
    """The Arrow tables of a folder written by ``datasets``' ``save_to_disk``: state.json lists the Arrow stream
    files (``_data_files``); a DatasetDict folder has dataset_dict.json and one such folder per split."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise TaskError(f"{folder} is a datasets folder with splits {', '.join(splits)}: say which with "
                            f"\"split:\" in the task file")
        folder = folder / split
    state_file = folder / "state.json"
    if not state_file.exists():
        raise TaskError(f"{folder}: a folder that is not a datasets folder (no state.json); give a JSON lines file, "
                        f"a parquet file or a folder written by datasets' save_to_disk")
    state = json.loads(state_file.read_text())
    if state.get("_indices_data_files"):
        raise TaskError(f"{folder}: saved with an indices mapping (a select / shuffle not flattened); save it "
                        f"again after dataset.flatten_indices()")
    pa = _arrow()
    tables = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"]), "r") as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return tables


def make_sample(task: Task, doc: dict, where: str) -> Sample:
    f = task.fields
    sample_id = str(doc[f["id"]]) if f["id"] in doc else where.rsplit(" ", 1)[-1]
    media = {kind: _paths(task, _media_value(task, doc, kind, where), where, kind) for kind in ("image", "video")}
    options, letters, gold = [], [], None
    if task.answer not in ("exact_match", "yes_no", "caption"):
        if task.option_letters:  # the question holds "(A) ..." itself; the letters stand for the options
            options = list(task.option_letters)
        elif task.option_fields:
            missing = [name for name in task.option_fields if name not in doc
                       or not (doc[name] is None or isinstance(doc[name], str))]
            if missing:
                raise TaskError(f"{where}: option field(s) {', '.join(missing)} missing or not text")
            options = [doc[name] for name in task.option_fields
                       if doc[name] is not None and doc[name] not in task.skip_options]
        else:
            options = doc.get(f["options"])
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise TaskError(f"{where}: field \"{f['options']}\" must be a non-empty list of option texts")
        letters = list(string.ascii_uppercase[:len(options)])
        gold = _gold_index(doc.get(f["answer"]), options, letters, where, f["answer"])
    else:
        answers = doc.get(f["answer"])
        gold = [answers] if isinstance(answers, str) else answers
        if not isinstance(gold, list) or not gold or not all(isinstance(a, str) for a in gold):
            raise TaskError(f"{where}: field \"{f['answer']}\" must be the answer text or a list of accepted texts")
    doc = _with_subtitles(task, _question_edited(task, doc), media["video"], where)
    if task.interleaved_subtitles:
        doc, media = _interleaved(task, doc, media, where)
    written = "\n".join(task.option_format.format(letter=l, option=o) for l, o in zip(letters, options))
    template = next((t for key, t in task.prompt_without.items() if _empty(doc.get(key))), task.prompt)
    try:
        prompt = template.format(**{**doc, "options": written, "letters": ", ".join(letters)})
    except (KeyError, IndexError) as e:
        raise TaskError(f"{where}: the prompt template uses {e} but the sample has no such field") from None
    meta = {name: doc.get(name) for name in task.meta_fields}
    return Sample(sample_id, prompt, media["image"], media["video"], options, gold, letters, meta)


def _with_subtitles(task: Task, doc: dict, videos: list[str], where: str) -> dict:
    """The record with ``subtitles``: the .srt lines at the task's sampled frames (subtitles.py, Video-MME's)."""
    if not task.subtitles:
        return doc
    from .subtitles import subtitle_text

    if not videos:
        raise TaskError(f"{where}: subtitles need the sample's video, and it has none")
    try:
        srt = task.media_root / task.subtitles["path"].format(**doc)
    except (KeyError, IndexError) as e:
        raise TaskError(f"{where}: subtitles path uses {e} but the sample has no such field") from None
    return {**doc, "subtitles": subtitle_text(Path(videos[0]), srt, int(task.subtitles.get("frames", 32)))}


def _interleaved(task: Task, doc: dict, media: dict, where: str) -> tuple[dict, dict]:
    """LongVideoBench's interleaved sample: the video's frames as image files, ``interleaved`` the prompt's prefix
    (subtitles.py's ``lvb_*``, lmms-eval's ``longvideobench_doc_to_text`` / ``_doc_to_visual_i``)."""
    from .subtitles import lvb_frame_files, lvb_frame_times, lvb_interleaved

    spec = task.interleaved_subtitles
    if not media["video"]:
        raise TaskError(f"{where}: interleaved_subtitles need the sample's video, and it has none")
    try:
        path = task.media_root / spec["path"].format(**doc)
        duration, offset = float(doc["duration"]), float(doc.get("starting_timestamp_for_subtitles") or 0)
    except (KeyError, IndexError) as e:
        raise TaskError(f"{where}: interleaved_subtitles need the field {e}, and the sample has none") from None
    if not path.exists():
        raise TaskError(f"{where}: subtitle file {path} does not exist (LongVideoBench's subtitles/ folder)")
    frames = int(spec.get("frames", 16))
    subtitles = json.loads(path.read_text(encoding="utf-8"))
    prefix = lvb_interleaved(lvb_frame_times(duration, frames), subtitles, offset, duration)
    images = lvb_frame_files(Path(media["video"][0]), duration, frames)
    return {**doc, "interleaved": prefix}, {"image": images, "video": []}


def _empty(value: Any) -> bool:
    """No value: missing, None, NaN or the text "nan" (pandas' missing value written out, as MMBench's hint)."""
    return value is None or value == "nan" or (isinstance(value, float) and value != value)


def _question_edited(task: Task, doc: dict) -> dict:
    """The record with its question stripped and the task's ``question_remove`` texts deleted (MME's
    ``mme_doc_to_text`` removes " Please answer yes or no." before adding its own instruction), then, with
    ``question_capitalize``, Python's ``str.capitalize`` (first letter upper case, the rest lower: ActivityNet-QA's
    ``activitynetqa_doc_to_text``)."""
    key = task.fields["question"]
    if not (task.question_remove or task.question_capitalize) or not isinstance(doc.get(key), str):
        return doc
    question = doc[key].strip()
    for text in task.question_remove:
        question = question.replace(text, "")
    return {**doc, key: question.capitalize() if task.question_capitalize else question}


def _media_value(task: Task, doc: dict, kind: str, where: str) -> Any:
    """The record's media path: the ``video_path`` / ``image_path`` template filled in, else the field's value."""
    template = task.video_path if kind == "video" else task.image_path
    if template is None:
        value = doc.get(task.fields[kind])
        return _bytes_file(value, where) if isinstance(value, dict) and "bytes" in value else value
    try:
        paths = [t.format(**doc) for t in ([template] if isinstance(template, str) else template)]
    except (KeyError, IndexError) as e:
        raise TaskError(f"{where}: {kind}_path {template!r} uses {e} but the sample has no such field") from None
    # several templates (ActivityNet-QA's .mp4 / .webm / .mkv): the first that exists, else the first
    return next((p for p in paths if (task.media_root / p).exists()), paths[0])


def _bytes_file(value: dict, where: str) -> str:
    """An image stored in the data as bytes (a parquet / HF ``Image`` column: {"bytes": ..., "path": ...}) written
    once to a file named by its SHA-256 under the temporary folder; the file's path."""
    import hashlib
    import tempfile

    data = value["bytes"]
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise TaskError(f"{where}: the image field holds no bytes (an HF Image column written without its data?)")
    suffix = Path(str(value.get("path") or "")).suffix or ".img"
    folder = Path(tempfile.gettempdir()) / "llava-next-images"
    folder.mkdir(exist_ok=True)
    path = folder / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not path.exists():
        part = path.with_suffix(f".{id(value)}.part")
        part.write_bytes(data)
        part.replace(path)
    return str(path)


def _paths(task: Task, value: Any, where: str, kind: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TaskError(f"{where}: field \"{task.fields[kind]}\" must be a {kind} path or a list of them")
    return [v if v.startswith("sample:") else str(task.media_root / v) for v in values]


def _gold_index(answer: Any, options: list[str], letters: list[str], where: str, key: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and answer.strip().isdigit() and int(answer) < len(options):
        return int(answer)
    if isinstance(answer, str):
        if answer.strip().upper() in letters:
            return letters.index(answer.strip().upper())
        if answer in options:
            return options.index(answer)
    raise TaskError(f"{where}: field \"{key}\" must be a letter ({', '.join(letters)}), an index below "
                    f"{len(options)} or one of the option texts, got {answer!r}")


def bundled_tasks() -> dict[str, Path]:
    """The task files shipped with the package (``llava_next/eval/benchmarks/*.yaml``) by name."""
    folder = Path(__file__).parent / "benchmarks"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}
