"""EchoAI under transformers' own common model and config tests (ModelTesterMixin, ConfigTester)."""

import contextlib
import copy
import unittest

import pytest
import torch

from configuration_echoai import EchoAIConfig
from modeling_echoai import EchoAIForPreTraining, EchoAIForVideoClassification, EchoAIModel, make_mask


try:
    import transformers_common

    common = transformers_common.load()
except (ImportError, RuntimeError) as error:  # no registry access and no local sdist
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)


class EchoAIModelTester:
    """Builds the tiny config and inputs the common tests run on (4 frames of 32x32 -> 32 tokens)."""

    def __init__(self, parent, batch_size=2):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = 32
        self.patch_size = 8
        self.num_channels = 3
        self.num_frames = 4
        self.tubelet_size = 2
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.intermediate_size = 37
        self.mask_ratio = 0.75
        self.is_training = True
        self.num_patches_per_frame = (self.image_size // self.patch_size) ** 2
        self.seq_length = (self.num_frames // self.tubelet_size) * self.num_patches_per_frame
        self.num_masked = (self.num_frames // self.tubelet_size) * int(self.mask_ratio * self.num_patches_per_frame)
        self.num_masks = self.num_masked  # the name the common SDPA test reads

    def get_config(self) -> EchoAIConfig:
        return EchoAIConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            num_frames=self.num_frames,
            tubelet_size=self.tubelet_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            decoder_hidden_size=16,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
            decoder_intermediate_size=24,
            mask_ratio=self.mask_ratio,
            num_labels=3,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = torch.randn(
            self.batch_size, self.num_frames, self.num_channels, self.image_size, self.image_size
        )
        return self.get_config(), {"pixel_values": pixel_values}


class EchoAIModelTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EchoAIModel, EchoAIForPreTraining, EchoAIForVideoClassification)
    pipeline_model_mapping = {}
    test_resize_embeddings = False  # no token vocabulary
    test_torch_exportable = False  # the export mixin is not part of the transformers sdist
    has_attentions = True

    def setUp(self):
        self.model_tester = EchoAIModelTester(self)
        self.config_tester = common.configuration.ConfigTester(
            self, config_class=EchoAIConfig, has_text_modality=False, hidden_size=36, num_attention_heads=6
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = copy.deepcopy(inputs_dict)
        if model_class is EchoAIForPreTraining:
            # A fixed mask: the common tests compare forward passes, which a freshly drawn mask would break.
            grid = (self.model_tester.num_frames // self.model_tester.tubelet_size, 4, 4)
            generator = torch.Generator().manual_seed(0)
            batch_size = inputs_dict["pixel_values"].shape[0]
            inputs_dict["bool_masked_pos"] = make_mask(
                batch_size, grid, self.model_tester.mask_ratio, generator=generator
            )
        if return_labels and model_class is EchoAIForVideoClassification:
            inputs_dict["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def test_model_get_set_embeddings(self):
        # A video model has no token vocabulary: its input embedding is the tubelet projection.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config))
            self.assertIsInstance(model.get_input_embeddings().projection, torch.nn.Conv3d)
            self.assertIsNone(model.get_output_embeddings())

    @contextlib.contextmanager
    def heads_only(self):
        """Run a common training test on the models that have a loss. The mixin skips base models listed in
        transformers' own MODEL_MAPPING, which a model outside the library is not; the bare encoder has no
        loss by design."""
        all_model_classes = self.all_model_classes
        self.all_model_classes = (EchoAIForPreTraining, EchoAIForVideoClassification)
        try:
            yield
        finally:
            self.all_model_classes = all_model_classes

    def test_training(self):
        with self.heads_only():
            super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        with self.heads_only():
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    def test_config(self):
        self.config_tester.run_common_tests()

    def encoder_outputs(self, model_class, config, inputs_dict, **flags):
        """A forward pass and the encoder's sequence length: the pretraining encoder sees only the visible
        tokens, so its sequence is shorter than the other models'."""
        model = model_class(copy.deepcopy(config)).eval()
        with torch.no_grad():
            outputs = model(**self._prepare_for_class(inputs_dict, model_class), **flags)
        masked = self.model_tester.num_masked if model_class is EchoAIForPreTraining else 0
        return outputs, self.model_tester.seq_length - masked

    def test_attention_outputs(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        config._attn_implementation = "eager"
        for model_class in self.all_model_classes:
            outputs, seq_length = self.encoder_outputs(model_class, config, inputs_dict, output_attentions=True)
            self.assertEqual(len(outputs.attentions), self.model_tester.num_hidden_layers)
            self.assertEqual(
                list(outputs.attentions[0].shape[-3:]),
                [self.model_tester.num_attention_heads, seq_length, seq_length],
            )

    def test_hidden_states_output(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            outputs, seq_length = self.encoder_outputs(model_class, config, inputs_dict, output_hidden_states=True)
            self.assertEqual(len(outputs.hidden_states), self.model_tester.num_hidden_layers + 1)
            self.assertEqual(list(outputs.hidden_states[0].shape[-2:]), [seq_length, self.model_tester.hidden_size])
