"""EchoAI in the browser: upload an echo video, get EF the way EchoNet-Dynamic measures it, and where it came from.

    python demo/app.py --model outputs/finetune              # http://127.0.0.1:7860
    python demo/app.py --model org/echoai-ef --port 8080     # a Hub id
    ECHOAI_MODEL=org/echoai-ef python app.py                 # on a Space: the model from a Space variable

The page takes an AVI, MP4 or multi-frame DICOM file (or one of the bundled phantom examples, rendered when the
app starts: never patient data) and shows, for a fine-tuned EF model:

* EF (%) -- the mean over the chosen protocol's clips (EchoNet's all-clips by default) -- with the spread over
  the clips and their number, exactly as `scripts/predict.py` reports it (the same predictor,
  `inference_echoai.predict_decoded`, the core of `predict_videos`);
* the EF of every clip along the video, with the heart beats `inference_echoai.detect_beats` found;
* where the estimate came from: the occlusion saliency of the clip centred on the first beat
  (`saliency_echoai`), blended into the clip as a video.

For a pretraining checkpoint (no EF head) it shows the masked reconstruction of the video's first clip instead.

Privacy: uploads and results live in a temporary folder this app creates (`GRADIO_TEMP_DIR`); Gradio deletes
files older than 10 minutes from it every 5 minutes, and the app removes the folder when it stops. Nothing is
logged. Research use only: EchoAI is not a medical device.

On a Space the EchoAI modules sit beside this file (see `demo/README.md`); in a checkout they are one folder up.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


HERE = Path(__file__).resolve().parent
for _folder in (HERE, HERE.parent):  # a Space holds the modules beside app.py; a checkout one folder up
    if (_folder / "modeling_echoai.py").is_file() and str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
        break

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForPreTraining  # noqa: E402
from transformers.models.auto.video_processing_auto import AutoVideoProcessor  # noqa: E402

from inference_echoai import (  # noqa: E402
    PROTOCOLS,
    ModelLoadingError,
    VideoClips,
    load_model_and_processor,
    make_figure,
    predict_decoded,
    protocol_clip_indices,
)
from saliency_echoai import decoded_saliency, overlay_frames, write_overlay_video  # noqa: E402
from synthetic_echonet import render_phantom, write_avi  # noqa: E402
from video_io_echoai import VideoDecodingError  # noqa: E402


BANNER = (
    "**Research use only. EchoAI is not a medical device** and must not be used for diagnosis or treatment. "
    "Uploads are processed in a temporary folder and deleted within minutes; nothing is kept or logged."
)
PROTOCOL_LABELS = {"all_clips": "all clips, EchoNet's test protocol", "k_clips": "4 evenly spaced clips",
                   "one_clip": "the clip at frame 0"}  # fmt: skip
NUM_CLIPS = 4  # for k_clips, as scripts/predict.py's default


@dataclass
class Analysis:
    """What the page shows for one upload; `error` alone when the file could not be used."""

    summary: str = ""
    curve: str | None = None  # PNG: EF per clip along the video, with the detected beats
    saliency: str | None = None  # MP4: the beat-centred clip with the saliency map blended in
    reconstruction: str | None = None  # PNG: masked reconstruction (pretraining checkpoints)
    error: str | None = None


class EchoAIDemo:
    """The model and what the page does with an uploaded file, without the page (so it can be tested alone)."""

    def __init__(self, model_name_or_path: str, device: str = "cpu", work_dir: str | os.PathLike | None = None):
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="echoai-demo-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.pretraining = "EchoAIForPreTraining" in _architectures(model_name_or_path)
        if self.pretraining:
            self.model = AutoModelForPreTraining.from_pretrained(model_name_or_path).to(device).eval()
            self.processor = AutoVideoProcessor.from_pretrained(model_name_or_path)
        else:
            self.model, self.processor = load_model_and_processor(model_name_or_path, device)
        self.name = str(model_name_or_path)

    def analyse(self, path: str | os.PathLike, protocol: str = "all_clips") -> Analysis:
        """EF (or the reconstruction) of one file; a file that cannot be read gives `Analysis(error=reason)`."""
        if protocol not in PROTOCOLS:
            return Analysis(error=f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        output = Path(tempfile.mkdtemp(dir=self.work_dir))
        if self.pretraining:
            return self._reconstruction(path, output)
        # Decoded once (every frame: the beats need them) for both the EF and the saliency map.
        item = VideoClips([path], self.processor, protocol, NUM_CLIPS, beat_by_beat=True)[0]
        result = predict_decoded(self.model, [item], beat_by_beat=True)[0]
        if result.error is not None:  # the reason predict.py gives, naming the file but not our temporary folder
            return Analysis(error=result.error.replace(os.fspath(path), Path(path).name))
        summary = (
            f"**EF {result.ef:.1f} %** (spread {result.clip_spread:.1f} over {result.num_clips} clip(s); "
            f"{PROTOCOL_LABELS[protocol]})"
        )
        if result.num_beats:
            summary += f" · beat by beat {result.ef_beat_by_beat:.1f} % over {result.num_beats} beat(s)"
        curve = self._clip_curve(result, protocol, output / "clips.png")
        saliency = decoded_saliency(self.model, self.processor, item)
        movie = write_overlay_video(
            output / "saliency.mp4", overlay_frames(saliency.frames, saliency.result.saliency), saliency.fps
        )
        return Analysis(summary=summary, curve=str(curve), saliency=str(movie))

    def _clip_curve(self, result, protocol: str, path: Path) -> Path:
        starts = protocol_clip_indices(result.num_video_frames, self.processor, protocol, NUM_CLIPS)[:, 0]
        figure = make_figure((7, 2.6), dpi=100)
        axis = figure.add_subplot(1, 1, 1)
        axis.plot(starts, result.clip_predictions, "o-" if len(starts) < 20 else "-", color="tab:blue", lw=1.2)
        axis.axhline(result.ef, color="tab:blue", ls="--", lw=0.8, label=f"mean {result.ef:.1f} %")
        for i, (ed, _) in enumerate(result.beats.beats if result.beats else []):
            axis.axvline(ed, color="tab:red", lw=0.8, alpha=0.6, label="detected beat (ED)" if i == 0 else None)
        axis.set_xlabel("clip start (frame)")
        axis.set_ylabel("EF (%)")
        axis.legend(loc="best", fontsize=8)
        figure.tight_layout()
        figure.savefig(path)
        return path

    def _reconstruction(self, path: str | os.PathLike, output: Path) -> Analysis:
        from training_echoai import save_reconstruction

        try:
            pixel_values = self.processor(path, return_tensors="pt")["pixel_values"]  # (1, T, C, H, W)
        except VideoDecodingError as error:
            return Analysis(error=error.reason.replace(os.fspath(path), Path(path).name))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            mask = self.model.make_mask(pixel_values, generator=generator)
            outputs = self.model(pixel_values=pixel_values, bool_masked_pos=mask)
        picture = save_reconstruction(self.model, pixel_values, outputs, self.processor, output / "reconstruction.png")
        summary = (
            f"**Pretraining checkpoint**: no EF head. Masked reconstruction of the first clip, "
            f"{self.model.config.mask_ratio:.0%} of the tubelets hidden (loss {float(outputs.loss):.3f})."
        )
        return Analysis(summary=summary, reconstruction=str(picture))


def _architectures(model_name_or_path: str) -> list[str]:
    config = Path(model_name_or_path).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("architectures") or []
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True).architectures or []
    except (OSError, ValueError):
        return []  # load_model_and_processor then says what is wrong


def make_examples(folder: Path, count: int = 3) -> list[str]:
    """Phantom echo videos rendered now (seeded, so the same every start): examples that are never patient data."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        video = render_phantom(np.random.SeedSequence(1000 + seed))
        path = folder / f"phantom_{seed + 1}.avi"
        write_avi(path, video.frames, video.fps)
        paths.append(str(path))
    return paths


def build_app(demo: EchoAIDemo, examples: list[str]):
    """The Gradio page for `demo`."""
    import gradio as gr

    def run(file, protocol):
        if file is None:
            return "", None, None, None, ""
        analysis = demo.analyse(file, protocol)
        error = f"**Could not read this file:** {analysis.error}" if analysis.error else ""
        return analysis.summary, analysis.curve, analysis.saliency, analysis.reconstruction, error

    with gr.Blocks(title="EchoAI: ejection fraction from echo video", delete_cache=(300, 600)) as app:
        gr.Markdown(f"# EchoAI: ejection fraction from an echo video\n\n{BANNER}\n\nModel: `{demo.name}`")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="AVI, MP4 or DICOM", type="filepath", elem_id="upload")
                protocol = gr.Radio(list(PROTOCOLS), value="all_clips", label="Clip protocol", elem_id="protocol")
                if examples and not demo.pretraining:
                    gr.Examples(examples, inputs=upload, label="Phantom examples (synthetic, not patient data)")
            with gr.Column(scale=2):
                error = gr.Markdown(elem_id="error")
                summary = gr.Markdown(elem_id="ef")
                curve = gr.Image(
                    label="EF of every clip along the video", type="filepath", elem_id="curve", height=300
                )
                saliency = gr.Video(label="Where the estimate came from (EF change when a block is left out)",
                                    elem_id="saliency", height=420)  # fmt: skip
                reconstruction = gr.Image(label="Masked reconstruction", type="filepath", visible=demo.pretraining)
        outputs = [summary, curve, saliency, reconstruction, error]
        upload.change(run, [upload, protocol], outputs)
        protocol.change(run, [upload, protocol], outputs)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=os.environ.get("ECHOAI_MODEL"),
        help="Fine-tuned (or pretraining) EchoAI folder or Hub id. Default: the ECHOAI_MODEL environment variable "
        "(a Space variable).",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=None, help="Default: GRADIO_SERVER_PORT, else 7860.")
    parser.add_argument("--host", default=None, help="Default: GRADIO_SERVER_NAME, else 127.0.0.1.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("no model: pass --model <folder or Hub id> or set ECHOAI_MODEL")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="echoai-demo-"))
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(work_dir / "uploads"))  # uploads land in the folder we delete
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        demo = EchoAIDemo(args.model, args.device, work_dir)
    except ModelLoadingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app = build_app(demo, make_examples(work_dir / "examples"))
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
