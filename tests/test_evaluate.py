"""Evaluation (confusion matrix, IoU, writers) and the pictures of lsd_jax.visualize."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lsd_jax import evaluate, visualize
from lsd_jax.data.classes import (CITYSCAPES_CLASSES, CITYSCAPES_COLORS,
                                  CITYSCAPES_LABELID_TO_TRAINID_PAIRS)

C = len(CITYSCAPES_CLASSES)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_hot_logits(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits (N, h, w, C) whose argmax is `classes` (N, h, w)."""
    return np.eye(num_classes, dtype=np.float32)[classes] * 5.0


def numpy_confusion(predictions, labels, num_classes):
    """Reference: count [label, prediction] pairs with a Python-level loop over classes."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for t in range(num_classes):
        for p in range(num_classes):
            matrix[t, p] = np.sum((labels == t) & (predictions == p))
    return matrix


def confusion_of(logits, labels, mask=None, num_classes=3, method="scatter"):
    mask = np.ones(len(labels), bool) if mask is None else mask
    zero = jnp.zeros((num_classes, num_classes), jnp.int32)
    return np.asarray(evaluate.update_confusion(zero, jnp.asarray(logits), jnp.asarray(labels),
                                                jnp.asarray(mask), num_classes, method))


# --- the confusion matrix ---------------------------------------------------------------------

@pytest.mark.parametrize("method", evaluate.CONFUSION_METHODS)
def test_confusion_is_exact_on_a_hand_made_case(method):
    predictions = np.array([[[0, 0, 1],
                             [2, 1, 1]]])
    labels = np.array([[[0, 1, 1],
                        [2, 2, 0]]])
    # rows = true class, columns = predicted class
    expected = np.array([[1, 1, 0],
                         [1, 1, 0],
                         [0, 1, 1]])
    got = confusion_of(one_hot_logits(predictions, 3), labels, method=method)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32


@pytest.mark.parametrize("method", evaluate.CONFUSION_METHODS)
def test_ignored_labels_and_padding_examples_are_not_counted(method):
    predictions = np.array([[[0, 1], [2, 2]],
                            [[1, 1], [1, 1]]])
    labels = np.array([[[0, 255], [255, 2]],
                       [[0, 1], [2, 0]]])
    only_first = np.array([True, False])
    got = confusion_of(one_hot_logits(predictions, 3), labels, only_first, method=method)
    expected = np.zeros((3, 3), int)
    expected[0, 0] = expected[2, 2] = 1
    np.testing.assert_array_equal(got, expected)
    # With both examples real, the second one adds its four pixels.
    both = confusion_of(one_hot_logits(predictions, 3), labels, method=method)
    assert both.sum() == 2 + 4
    np.testing.assert_array_equal(both[:, 1], [2, 1, 1])


def test_labels_outside_the_classes_are_ignored_like_255():
    predictions = np.zeros((1, 1, 4), int)
    labels = np.array([[[0, 3, 200, 255]]])
    got = confusion_of(one_hot_logits(predictions, 3), labels)
    assert got.sum() == 1 and got[0, 0] == 1


def test_logits_are_upsampled_to_label_resolution():
    # Two logit pixels (class 0 left, class 1 right) predicted over a 4-pixel-wide label.
    logits = one_hot_logits(np.array([[[0, 1]]]), 2)
    labels = np.array([[[0, 0, 0, 1]]])
    np.testing.assert_array_equal(
        evaluate.predict_labels(jnp.asarray(logits), 1, 4), [[[0, 0, 1, 1]]])
    np.testing.assert_array_equal(confusion_of(logits, labels, num_classes=2),
                                  [[2, 1], [0, 1]])


def test_bilinear_upsampling_matches_pytorch_align_corners_false():
    torch = pytest.importorskip("torch")
    logits = np.random.RandomState(0).randn(2, 5, 7, 4).astype(np.float32)
    for height, width in [(10, 14), (13, 19), (40, 56)]:
        ours = np.asarray(evaluate.upsample_logits(jnp.asarray(logits), height, width))
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(logits).permute(0, 3, 1, 2), size=(height, width),
            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_scatter_and_matmul_counts_agree_with_numpy():
    rng = np.random.RandomState(1)
    logits = rng.randn(3, 6, 10, C).astype(np.float32)
    labels = rng.randint(0, C, (3, 12, 20))
    labels[rng.rand(*labels.shape) < 0.2] = 255
    predictions = np.asarray(evaluate.predict_labels(jnp.asarray(logits), 12, 20))
    expected = numpy_confusion(predictions, labels, C)
    for method in evaluate.CONFUSION_METHODS:
        np.testing.assert_array_equal(confusion_of(logits, labels, num_classes=C, method=method),
                                      expected)


def test_unknown_confusion_method_is_refused():
    with pytest.raises(ValueError, match="'histogram'.*scatter"):
        confusion_of(np.zeros((1, 1, 1, 3)), np.zeros((1, 1, 1), int), method="histogram")


# --- the eval loop ----------------------------------------------------------------------------

def random_batches(rng, num_batches, num_classes, padded_last=True):
    batches = []
    for b in range(num_batches):
        mask = np.ones(2, bool)
        if padded_last and b == num_batches - 1:
            mask[1] = False
        labels = rng.randint(0, num_classes, (2, 8, 12))
        labels[:, 0] = 255
        batches.append({"image": rng.randn(2, 4, 6, num_classes).astype(np.float32),
                        "label": labels, "mask": mask})
    return batches


def reference_confusion(batches, num_classes):
    total = np.zeros((num_classes, num_classes), np.int64)
    for batch in batches:
        predictions = np.asarray(evaluate.predict_labels(jnp.asarray(batch["image"]), 8, 12))
        real = batch["mask"]
        total += numpy_confusion(predictions[real], batch["label"][real], num_classes)
    return total


def test_evaluate_streams_batches_into_one_exact_int64_matrix():
    batches = random_batches(np.random.RandomState(2), 3, 4)
    seen = []
    confusion = evaluate.evaluate(lambda image: image, batches, 4,
                                  on_predictions=lambda batch, pred: seen.append(pred.shape))
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, reference_confusion(batches, 4))
    assert seen == [(2, 8, 12)] * 3
    # A batch without "mask" counts every example.
    no_mask = [{"image": b["image"], "label": b["label"]} for b in batches[:1]]
    np.testing.assert_array_equal(evaluate.evaluate(lambda image: image, no_mask, 4),
                                  reference_confusion(batches[:1], 4))


def test_evaluate_folds_the_int32_device_matrix_before_it_could_overflow(monkeypatch):
    batches = random_batches(np.random.RandomState(3), 5, 4, padded_last=False)
    transfers = []
    real_to_host = evaluate._to_host
    monkeypatch.setattr(evaluate, "_to_host", lambda x: transfers.append(1) or real_to_host(x))
    # Room for two batches of 2x8x12 = 192 pixels between folds: 5 batches -> 3 transfers.
    monkeypatch.setattr(evaluate, "DEVICE_COUNT_LIMIT", 2 * 192)
    confusion = evaluate.evaluate(lambda image: image, batches, 4)
    np.testing.assert_array_equal(confusion, reference_confusion(batches, 4))
    assert len(transfers) == 3
    monkeypatch.setattr(evaluate, "DEVICE_COUNT_LIMIT", 100)
    with pytest.raises(ValueError, match="192 label pixels"):
        evaluate.evaluate(lambda image: image, batches, 4)


def test_evaluate_names_a_batch_without_labels():
    with pytest.raises(KeyError, match="batch 0 lacks \\['label'\\]"):
        evaluate.evaluate(lambda image: image, [{"image": np.zeros((1, 2, 2, 3))}], 3)


def test_evaluate_an_fcn8s_with_labels_at_twice_its_input_size():
    from lsd_jax.models import FCN8s
    model = FCN8s(num_classes=C, width=1 / 32)
    image = np.random.RandomState(4).randn(1, 32, 48, 3).astype(np.float32)
    # Constant parameters from the shapes alone: model.init costs seconds on CPU, and what is
    # tested here is the plumbing (F's outputs -> upsampling -> counts), not the scores.
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image, train=False))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    labels = np.full((1, 64, 96), 255)
    labels[:, 10:50, 20:70] = 7
    shapes_seen = []
    confusion = evaluate.evaluate(evaluate.fcn_predict_fn(model, variables),
                                  [{"image": image, "label": labels}], C,
                                  on_predictions=lambda _, pred: shapes_seen.append(pred.shape))
    assert shapes_seen == [(1, 64, 96)]
    assert confusion.sum() == 40 * 50 and confusion[7].sum() == 40 * 50


# --- IoU --------------------------------------------------------------------------------------

def test_iou_from_confusion_excludes_undefined_classes_from_the_mean():
    confusion = np.array([[3, 1, 0, 0],
                          [1, 2, 0, 0],
                          [0, 0, 0, 0],    # class 2: never labelled, never predicted
                          [0, 1, 0, 0]])   # class 3: labelled once, never predicted right
    iou, miou = evaluate.iou_from_confusion(confusion)
    expected = [3 / (4 + 4 - 3), 2 / (3 + 4 - 2), math.nan, 0.0]
    np.testing.assert_allclose(iou, expected)
    assert miou == pytest.approx((0.6 + 0.4 + 0.0) / 3)
    _, subset_miou = evaluate.iou_from_confusion(confusion, class_indices=[0, 2])
    assert subset_miou == pytest.approx(0.6)
    assert math.isnan(evaluate.iou_from_confusion(confusion, [2])[1])


def test_iou_refuses_bad_input_with_the_bad_value_named():
    with pytest.raises(ValueError, match="square"):
        evaluate.iou_from_confusion(np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="-5"):
        evaluate.iou_from_confusion(np.array([[1, -5], [0, 1]]))
    with pytest.raises(ValueError, match=r"\[0, 7\].*\[0, 2\)"):
        evaluate.iou_from_confusion(np.eye(2, dtype=int), [0, 7])


def write_label_png(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def test_miou_equals_the_official_cityscapes_evaluation(tmp_path, monkeypatch):
    """Same predictions, scored by cityscapesScripts and by us: identical IoUs and mean."""
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    official = pytest.importorskip(
        "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import trainId2label

    rng = np.random.RandomState(5)
    train_to_label_id = {t: i for i, t in CITYSCAPES_LABELID_TO_TRAINID_PAIRS.items()}
    label_ids = np.array(sorted(CITYSCAPES_LABELID_TO_TRAINID_PAIRS) + [0, 1, 4, 5, 9, 29])
    to_train_id = np.full(256, 255)
    for label_id, train_id in CITYSCAPES_LABELID_TO_TRAINID_PAIRS.items():
        to_train_id[label_id] = train_id
    # Leave out "train" (16) entirely (undefined IoU) and never predict "bus" (15).
    label_ids = label_ids[label_ids != 31]
    batches, ground_truth_files, prediction_files = [], [], []
    for i in range(3):
        gt_ids = rng.choice(label_ids, size=(40, 64))
        logits = rng.randn(1, 20, 32, C).astype(np.float32)
        logits[..., 15] -= 100
        logits[..., 16] -= 100
        logits[0, :10, :16, 13] += 3  # some structure: a "car" corner, mostly right
        gt_ids[:20, :32] = np.where(rng.rand(20, 32) < 0.7, 26, gt_ids[:20, :32])
        predicted = np.asarray(evaluate.predict_labels(jnp.asarray(logits), 40, 64))[0]
        name = f"city_{i:06d}_000019"
        gt_file = tmp_path / "gtFine" / "val" / "city" / f"{name}_gtFine_labelIds.png"
        prediction_file = tmp_path / "results" / f"{name}_pred.png"
        write_label_png(gt_file, gt_ids)
        write_label_png(prediction_file, np.vectorize(train_to_label_id.get)(predicted))
        ground_truth_files.append(str(gt_file))
        prediction_files.append(str(prediction_file))
        batches.append({"image": logits, "label": to_train_id[gt_ids][None],
                        "mask": np.ones(1, bool)})

    for field, value in dict(evalInstLevelScore=False, evalPixelAccuracy=False,
                             JSONOutput=False, quiet=True).items():
        monkeypatch.setattr(official.args, field, value)
    result = official.evaluateImgLists(prediction_files, ground_truth_files, official.args)

    iou, miou = evaluate.iou_from_confusion(evaluate.evaluate(lambda x: x, batches, C))
    theirs = np.array([result["classScores"][trainId2label[t].name] for t in range(C)])
    np.testing.assert_array_equal(np.isnan(iou), np.isnan(theirs))
    assert np.isnan(iou[16]) and iou[15] == 0.0
    np.testing.assert_allclose(iou[~np.isnan(iou)], theirs[~np.isnan(theirs)], rtol=0, atol=1e-6)
    assert miou == pytest.approx(result["averageScoreClasses"], abs=1e-6)


# --- reports ----------------------------------------------------------------------------------

def test_results_are_written_as_json_and_markdown(tmp_path):
    confusion = np.zeros((C, C), int)
    confusion[0, 0], confusion[0, 1], confusion[13, 13] = 6, 2, 4
    subsets = {"(2 classes)": [0, 13]}
    summary = evaluate.summarize(confusion, CITYSCAPES_CLASSES, subsets, {"step": 1000})
    json_path, markdown_path = evaluate.write_results(tmp_path / "eval", summary)
    written = json.loads(open(json_path).read())
    assert written["step"] == 1000 and written["num_pixels"] == 12
    assert written["per_class_iou"]["road"] == pytest.approx(0.75)
    assert written["per_class_iou"]["sidewalk"] == 0.0
    assert written["per_class_iou"]["bicycle"] is None        # undefined, not NaN
    assert written["miou"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert written["subsets"]["(2 classes)"]["miou"] == pytest.approx(0.875)
    assert written["confusion"][0][:2] == [6, 2]
    markdown = open(markdown_path).read()
    assert "| road | 75.00 | x |" in markdown
    assert "| bicycle | n/a |  |" in markdown
    assert "**mIoU (3 classes)** | **58.33**" in markdown
    assert "**mIoU (2 classes)** | **87.50**" in markdown


def test_summarize_needs_one_name_per_class():
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        evaluate.summarize(np.eye(3, dtype=int), ["a", "b"])


def test_prediction_pngs_are_colourised(tmp_path):
    predicted = np.array([[[0, 13], [18, 255]]])
    (path,) = evaluate.write_prediction_pngs(tmp_path, predicted, ["frankfurt_0"])
    pixels = np.asarray(Image.open(path))
    np.testing.assert_array_equal(pixels[0], [CITYSCAPES_COLORS[0], CITYSCAPES_COLORS[13]])
    np.testing.assert_array_equal(pixels[1], [CITYSCAPES_COLORS[18], [0, 0, 0]])


@pytest.mark.slow
def test_evaluate_imports_without_tensorflow():
    code = ("import sys, lsd_jax.evaluate, lsd_jax.visualize, lsd_jax.distributed; "
            "sys.exit('tensorflow' in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO_ROOT)


# --- visualize --------------------------------------------------------------------------------

def test_colorize_uses_the_cityscapes_palette_and_black_for_ignore():
    picture = visualize.colorize(np.array([[0, 10], [255, 18]]))
    assert picture.dtype == np.uint8 and picture.shape == (2, 2, 3)
    np.testing.assert_array_equal(picture[0, 0], (128, 64, 128))   # road
    np.testing.assert_array_equal(picture[0, 1], (70, 130, 180))   # sky
    np.testing.assert_array_equal(picture[1, 0], (0, 0, 0))
    np.testing.assert_array_equal(picture[1, 1], (119, 11, 32))    # bicycle
    with pytest.raises(ValueError, match=r"\[19, 200\]"):
        visualize.colorize(np.array([[19, 200, 3]]))


def test_denormalize_inverts_f_preprocessing():
    rgb = np.random.RandomState(6).randint(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    f_input = rgb[..., ::-1].astype(np.float32) - np.array(visualize.VGG_MEAN_BGR, np.float32)
    np.testing.assert_array_equal(visualize.denormalize_image(f_input), rgb)
    np.testing.assert_array_equal(visualize.unit_image_to_rgb(rgb[..., ::-1] / 255.0), rgb)


def test_visualize_mean_matches_the_model_constant():
    from lsd_jax.models import VGG_MEAN_BGR
    assert visualize.VGG_MEAN_BGR == tuple(VGG_MEAN_BGR)


def test_summary_grid_puts_four_panels_side_by_side():
    n, h, w = 3, 8, 12
    image = np.zeros((n, h, w, 3), np.float32) - np.array(visualize.VGG_MEAN_BGR, np.float32)
    reconstruction = np.ones((n, h, w, 3), np.float32)
    prediction = np.full((n, 2 * h, 2 * w), 13)     # label resolution is larger: resized down
    label = np.full((n, 2 * h, 2 * w), 255)
    grid = visualize.summary_grid(image, reconstruction, prediction, label, max_examples=2)
    pad = 4
    assert grid.shape == (2, h, 4 * w + 3 * pad, 3) and grid.dtype == np.uint8
    panel = lambda i: grid[:, :, i * (w + pad):i * (w + pad) + w]  # noqa: E731
    assert (panel(0) == 0).all() and (panel(1) == 255).all() and (panel(3) == 0).all()
    assert (panel(2) == CITYSCAPES_COLORS[13]).all()
    assert (grid[:, :, w:w + pad] == 255).all()
    target_grid = visualize.summary_grid(image, None, prediction[:, :h, :w], None)
    assert target_grid.shape == (3, h, 2 * w + pad, 3)
