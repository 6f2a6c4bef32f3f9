"""Classification and sentiment heads: shapes, what they read, losses against hand values, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from mit_lightning.backbones.llm import LLMShape
from mit_lightning.errors import UserError
from mit_lightning.fusion.base import FusionInputs, ModelDims
from mit_lightning.heads import ImageTextClassification, SentimentRegression

TEXT_DIM, IMAGE_DIM, CLASSES, BATCH = 8, 6, 3, 4
SHAPE = LLMShape(hidden_size=TEXT_DIM, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=16)


def classification_head(**kwargs) -> ImageTextClassification:
    dims = ModelDims(llm=SHAPE, vectors={"image": IMAGE_DIM}, num_classes=CLASSES)
    return ImageTextClassification(dims, hidden=16, dropout=0.0, **kwargs).eval()


def sentiment_head() -> SentimentRegression:
    dims = ModelDims(llm=SHAPE, vectors={"audio": 5, "facial": 7})
    return SentimentRegression(dims, hidden=16, dropout=0.0).eval()


def features(seed: int = 0) -> tuple[torch.Tensor, FusionInputs]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(BATCH, TEXT_DIM, generator=generator)
    vectors = {
        "image": torch.randn(BATCH, IMAGE_DIM, generator=generator),
        "audio": torch.randn(BATCH, 5, generator=generator),
        "facial": torch.randn(BATCH, 7, generator=generator),
    }
    return text, FusionInputs(vectors=vectors)


# --- image-text classification ---------------------------------------------------------------------
def test_classifier_gives_one_logit_per_class_from_image_and_text():
    head = classification_head()
    text, inputs = features()
    logits = head(text, inputs)
    assert logits.shape == (BATCH, CLASSES)
    other_image = FusionInputs(vectors={**inputs.vectors, "image": inputs.vectors["image"] + 1.0})
    assert not torch.allclose(head(text, other_image), logits), "the global image feature must reach the classifier"
    assert not torch.allclose(head(text + 1.0, inputs), logits), "the infused text feature must reach the classifier"


def test_classifier_accepts_a_half_precision_image_feature():
    """CLIP runs in bf16 while the text feature reaches the head in float32."""
    head = classification_head()
    text, inputs = features()
    half = FusionInputs(vectors={"image": inputs.vectors["image"].bfloat16()})
    assert head(text, half).dtype == torch.float32


def test_cross_entropy_matches_a_hand_computed_value():
    head = classification_head()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    # -log softmax of the true class: log(1 + 2e^-2) and log(2 + e)
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(2 + math.e)) / 2
    assert head.loss(logits, {"label": labels}).item() == pytest.approx(expected, rel=1e-6)


def test_classification_gradients_reach_every_head_weight_and_both_inputs():
    head = classification_head()
    text, inputs = features()
    text.requires_grad_(True)
    image = inputs.vectors["image"].requires_grad_(True)
    loss = head.loss(head(text, inputs), {"label": torch.tensor([0, 1, 2, 1])})
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


def test_class_count_comes_from_the_data_unless_the_head_sets_it():
    assert classification_head().classifier[-1].out_features == CLASSES
    assert classification_head(num_classes=5).classifier[-1].out_features == 5
    with pytest.raises(UserError, match="number of classes"):
        ImageTextClassification(ModelDims(llm=SHAPE, vectors={"image": IMAGE_DIM}))


def test_classifier_without_a_vision_tower_is_refused_clearly():
    with pytest.raises(UserError, match="needs a vision tower"):
        ImageTextClassification(ModelDims(llm=SHAPE, vectors={"audio": 5}, num_classes=CLASSES))


def test_classification_metrics_and_predictions():
    head = classification_head()
    metrics = head.make_metrics()
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    batch = {"label": torch.tensor([0, 1, 2, 2]), "index": torch.arange(4)}
    head.update_metrics(metrics, logits, batch)
    results = metrics.compute()
    assert results["accuracy"].item() == pytest.approx(0.75)
    assert results["confusion_matrix"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    predicted = head.predict(logits, batch)
    assert predicted["prediction"].tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(predicted["probabilities"].sum(dim=-1), torch.ones(4))


# --- sentiment regression --------------------------------------------------------------------------
def test_sentiment_head_gives_one_score_per_sample_from_the_text_feature_only():
    head = sentiment_head()
    text, inputs = features()
    scores = head(text, inputs)
    assert scores.shape == (BATCH,)
    changed = FusionInputs(vectors={name: vector + 5.0 for name, vector in inputs.vectors.items()})
    torch.testing.assert_close(head(text, changed), scores, rtol=0, atol=0)  # other modalities act through infusion
    assert not torch.allclose(head(text + 1.0, inputs), scores)


def test_rmse_matches_a_hand_computed_value():
    head = sentiment_head()
    prediction = torch.tensor([0.5, -1.0, 2.0])
    label = torch.tensor([1.5, -1.0, 0.0])
    # errors 1, 0, 2: RMSE = sqrt(5/3), not MSE (5/3) nor MAE (1)
    assert head.loss(prediction, {"label": label}).item() == pytest.approx(math.sqrt(5 / 3), rel=1e-6)


def test_rmse_gradient_stays_finite_for_an_exact_prediction():
    head = sentiment_head()
    prediction = torch.tensor([0.3, -2.0], requires_grad=True)
    loss = head.loss(prediction, {"label": prediction.detach().clone()})
    loss.backward()
    assert loss.item() < 1e-3
    assert torch.isfinite(prediction.grad).all()


def test_sentiment_gradients_reach_every_head_weight_and_the_text_feature():
    head = sentiment_head()
    text, inputs = features()
    text.requires_grad_(True)
    loss = head.loss(head(text, inputs), {"label": torch.tensor([2.0, -1.0, 0.0, 0.4])})
    loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0


def test_sentiment_metrics_and_predictions():
    head = sentiment_head()
    metrics = head.make_metrics()
    batch = {"label": torch.tensor([2.0, -1.0, 0.0, 1.0]), "index": torch.arange(4), "id": ["a", "b", "c", "d"]}
    output = torch.tensor([1.6, -0.8, 0.2, -0.1])
    head.update_metrics(metrics, output, batch)
    scores = metrics.compute()
    assert scores["MAE"].item() == pytest.approx((0.4 + 0.2 + 0.2 + 1.1) / 4, rel=1e-6)
    assert scores["Acc2_has0"].item() == pytest.approx(0.75)  # 1.0 vs -0.1 is the only sign error
    torch.testing.assert_close(head.predict(output, batch)["prediction"], output)


# --- the task in one place --------------------------------------------------------------------------
def test_a_head_names_a_task_there_is_or_none():
    from mit_lightning.heads.base import TaskHead

    with pytest.raises(TypeError, match="'segmentaton'"):
        type("Misnamed", (TaskHead,), {"task": "segmentaton"})
    assert type("Untasked", (TaskHead,), {}).task is None


def test_each_head_answers_new_inputs_as_served():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]])
    classification = classification_head()
    answers = classification.answers(logits, class_names=["cat", "dog", "owl"])
    assert [answer["label"] for answer in answers] == ["cat", "owl"] and answers[1]["label_index"] == 2
    expected = torch.softmax(logits[0], dim=0).tolist()
    assert list(answers[0]["probabilities"].values()) == pytest.approx(expected)
    sentiment = sentiment_head()
    assert sentiment.answers(torch.tensor([1.5, -2.0])) == [{"score": 1.5}, {"score": -2.0}]
