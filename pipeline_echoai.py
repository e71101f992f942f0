"""The EF pipeline: ejection fraction of echo videos with EchoNet-Dynamic's clip protocols, as a transformers pipeline.

    from transformers import pipeline
    ef = pipeline(model="outputs/finetune", trust_remote_code=True)
    ef("video.avi")  # {"EF": 57.3, "clip_spread": 1.9, "num_clips": 140, "error": None}

`scripts/finetune.py` saves the pipeline with every EF model (`save_ef_pipeline`): the model's config names it
(`custom_pipelines`, task "echo-ejection-fraction") and this file and the modules it imports sit beside the weights,
so `pipeline(model=folder, trust_remote_code=True)` builds it with no task given and without EchoAI installed.

The answer is `inference_echoai.predict_videos`' -- the predictor behind `scripts/predict.py`, evaluation and
validation -- taken one video at a time: `preprocess` decodes a video once (`VideoClips`: only the frames the
protocol's clips use, resized and normalised by the processor saved with the model), `_forward` runs the model over
its clips in batches of `clip_batch_size` and averages them (`predict_decoded`), `postprocess` names the numbers as
`predict.py` does. Per video: `EF` (%), the mean over the protocol's clips -- every clip start ("all_clips", EchoNet's
test protocol, the default), `num_clips` evenly spaced ones ("k_clips") or the clip at frame 0 ("one_clip") --;
`clip_spread`, the standard deviation of the clip predictions; `num_clips`; and `error`, why a video could not be
read (then EF is None), so one bad file in a list does not stop the others.

Inputs: a video file's path, a list of them, or an array of frames (T, H, W) or (T, H, W, C) uint8 (a tensor too),
read the way the processor reads it. transformers' stock `pipeline("video-classification", ...)` also runs on the
same folder; it scores one clip (the clip at frame 0) and answers `[{"label": "EF", "score": EF}]`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForVideoClassification, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save
from transformers.pipelines import PIPELINE_REGISTRY, Pipeline


try:  # loaded as Hub remote code, beside the model's files
    from .inference_echoai import PROTOCOLS, VideoClips, VideoPrediction, predict_decoded
except ImportError:  # installed as top-level modules
    from inference_echoai import PROTOCOLS, VideoClips, VideoPrediction, predict_decoded


TASK = "echo-ejection-fraction"


class EchoAIEFPipeline(Pipeline):
    """Ejection fraction (%) of echo videos with EchoNet-Dynamic's clip protocols; see the module docstring.

    Call: `pipe(videos, protocol="all_clips", num_clips=4, clip_batch_size=32)`, where `videos` is a path, an array
    of frames or a list of these; returns one dict (`EF`, `clip_spread`, `num_clips`, `error`) per video, a list for
    a list. `protocol` is "all_clips", "k_clips" (with `num_clips`) or "one_clip", as `scripts/predict.py
    --protocol`; `clip_batch_size` clips go through the model at once (`predict.py --per_device_eval_batch_size`).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.video_processor is None:
            raise ValueError(
                "the EF pipeline needs the video processor the model was trained with: save it beside the model "
                "with processor.save_pretrained(folder)"
            )
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"the EF pipeline needs a regression model (num_labels=1), got num_labels={self.model.config.num_labels}"
                '; use pipeline("video-classification", ...) for class probabilities'
            )

    def _sanitize_parameters(self, protocol=None, num_clips=None, clip_batch_size=None):
        preprocess_params, forward_params = {}, {}
        if protocol is not None:
            if protocol not in PROTOCOLS:
                raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
            preprocess_params["protocol"] = protocol
        if num_clips is not None:
            preprocess_params["num_clips"] = num_clips
        if clip_batch_size is not None:
            forward_params["clip_batch_size"] = clip_batch_size
        return preprocess_params, forward_params, {}

    def preprocess(self, video, protocol: str = "all_clips", num_clips: int = 4):
        if isinstance(video, Path):
            video = os.fspath(video)
        if not isinstance(video, (str, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"the EF pipeline takes a video file's path, an array of frames (T, H, W[, C]) or a list of these, "
                f"got {type(video).__name__}"
            )
        return VideoClips([video], self.video_processor, protocol, num_clips)[0]  # `DecodedVideo`

    def _forward(self, decoded, clip_batch_size: int = 32) -> VideoPrediction:
        return predict_decoded(self.model, [decoded], batch_size=clip_batch_size)[0]

    def postprocess(self, prediction: VideoPrediction) -> dict:
        def number(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "EF": number(prediction.ef),
            "clip_spread": number(prediction.clip_spread),
            "num_clips": prediction.num_clips,
            "error": prediction.error,
        }


def save_ef_pipeline(model: PreTrainedModel, folder: str | os.PathLike) -> None:
    """Make a fine-tuned EF model saved in `folder` open as the EF pipeline: its config names the pipeline
    (`custom_pipelines`, what `Pipeline.save_pretrained` writes) and this file, with the modules it imports, is copied
    beside it. Call after `model.save_pretrained(folder)`; the weights are not written again."""
    registered = EchoAIEFPipeline._registered_impl[TASK]
    model.config.custom_pipelines = {
        TASK: {
            **registered,
            "impl": f"{Path(__file__).stem}.{EchoAIEFPipeline.__name__}",
            "pt": tuple(auto_class.__name__ for auto_class in registered["pt"]),
        }
    }
    model.config.save_pretrained(folder)
    custom_object_save(EchoAIEFPipeline, folder)


# As with the model and processor: register when installed; as remote code the saved config names the class.
if not __package__:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=EchoAIEFPipeline, pt_model=AutoModelForVideoClassification, type="video"
    )


__all__ = ["TASK", "EchoAIEFPipeline", "save_ef_pipeline"]
