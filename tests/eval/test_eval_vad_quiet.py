"""Loading the voice-activity model prints nothing: silero-vad's TorchScript file goes through torch.jit.load,
which newer torch releases deprecate with a warning (a FutureWarning in some) that users of
``personaplex eval fdb score`` cannot act on."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("silero_vad")


def test_loading_the_vad_model_raises_no_deprecation_warning():
    from personaplex.eval import vad

    vad._model.cache_clear()
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        vad._model()
    assert not [str(w.message) for w in raised if issubclass(w.category, (FutureWarning, DeprecationWarning))]
