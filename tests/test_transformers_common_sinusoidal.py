"""transformers' common model tests again, on EchoAI with VideoMAE's fixed sinusoidal position table (a saved
buffer rather than learned parameters): saving, loading, initialisation and device moves must treat it right."""

import test_transformers_common as common_tests  # skips this module too when the common tests are unavailable

from configuration_echoai import EchoAIConfig


class EchoAISinusoidalModelTester(common_tests.EchoAIModelTester):
    def get_config(self) -> EchoAIConfig:
        config = super().get_config()
        config.position_embedding_type = "sinusoidal"
        return config


class EchoAISinusoidalModelTest(common_tests.EchoAIModelTest):
    def setUp(self):
        super().setUp()
        self.model_tester = EchoAISinusoidalModelTester(self)
