"""``unorm.keras.AGC``: Adaptive Gradient Clipping as a Keras optimizer (``SPEC.md`` section 5;
Brock et al. 2021, arXiv 2102.06171)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from ..spec import AGCSpec, UnitAxes
from . import hooks, internals
from .clip import clip_gradients
from .layout import Exclude, UnitAxesOverride, VariableSetting, describe, resolve, short_names

__all__ = ["AGC", "adaptive_clip_grad"]

# Base-optimizer arguments that belong on the wrapped optimizer, not on the wrapper.
_INNER_ONLY = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


class _Options:
    """AGC's non-numeric settings, in a plain holder: Keras optimizers track every
    attribute that holds variables or layers, and these must not become optimizer state."""

    def __init__(self, model: Any, exclude: Exclude, unit_axes: UnitAxesOverride) -> None:
        self.model = model
        self.exclude = exclude
        self.unit_axes = unit_axes
        self.settings: list[VariableSetting] = []


@keras.saving.register_keras_serializable(package="unorm")
class AGC(keras.optimizers.Optimizer):
    """A Keras optimizer that clips every update's gradients with AGC, then lets the
    wrapped optimizer apply them.

    Use it wherever an optimizer goes (``model.compile(optimizer=AGC(...))``, custom
    loops with ``apply``/``apply_gradients``); it serialises with the model
    (``get_config``/``from_config``, ``.keras`` files; import ``unorm.keras`` before
    loading). Learning rate and iterations are the wrapped optimizer's; ``variables`` are
    this wrapper's own (the base optimizer's iteration and learning rate) followed by the
    wrapped optimizer's.

    The clip runs on the effective gradient, once per update: after loss-scale
    unscaling (``LossScaleOptimizer``, which ``compile`` adds under ``mixed_float16``,
    may wrap AGC or be wrapped by it), on the accumulated gradient with the wrapped
    optimizer's ``gradient_accumulation_steps``, and after the all-reduce under a
    ``tf.distribute`` strategy. Non-finite gradients pass unchanged, so a loss scaler
    still skips the step. With decoupled weight decay (``AdamW``, ``weight_decay=``) the
    decay step of an update comes first, as Keras applies it before the gradient.

    Output-unit axes come from the layer that owns each variable: Dense and Conv kernels
    ``(..., in, out)`` -> -1, Conv*DTranspose ``(..., out, in)`` -> -2, DepthwiseConv
    ``(..., in, multiplier)`` -> (-2, -1), SeparableConv's two kernels, Embedding -> 0
    (rows); variables of rank <= 1 are one unit. Pass the ``model`` so AGC can read the
    layers; a variable of rank >= 2 with no known layer needs a ``unit_axes`` entry.

    Args:
        optimizer: the Keras optimizer to wrap (an instance, or a name/config for
            ``keras.optimizers.get``).
        model: the model (or layer) whose layers own the variables; needed for every
            variable of rank >= 2 not covered by ``unit_axes``. Not serialised: the
            config records the axes it gave instead.
        clipping: 0.01. The largest allowed ratio ``||G_i|| / max(||W_i||, eps)``.
        eps: 1e-3. The floor under a unit's weight norm.
        exclude: variables left unclipped: variables, layers (all their variables) or
            names, e.g. ``final_classifier(model)``. A name matches a run of whole parts
            of a variable's path: ``"dense_1"`` or ``"dense_1/kernel"``.
        unit_axes: overrides: one axis (int) for every variable of rank >= 2, or a
            mapping from layers or names to axes (a variable by its path: Keras variables
            are not hashable; int, tuple, or None for
            one unit).
        name: the optimizer's name.

    Example:
        >>> import numpy as np
        >>> from unorm.keras import AGC, final_classifier
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                           keras.layers.Dense(2)])
        >>> opt = AGC(keras.optimizers.SGD(0.1), model, clipping=0.01,
        ...           exclude=final_classifier(model))
        >>> model.compile(optimizer=opt, loss="mse")
        >>> x = np.ones((4, 4), "float32")
        >>> model.fit(x, np.zeros((4, 2), "float32"), verbose=0).history["loss"][0] >= 0
        True
    """

    def __init__(
        self,
        optimizer: Any,
        model: Any = None,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        exclude: Exclude = (),
        unit_axes: UnitAxesOverride = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        given = sorted(set(kwargs) & set(_INNER_ONLY))
        if given:
            raise ValueError(
                f"AGC takes no {', '.join(given)}: set it on the wrapped optimizer instead"
            )
        if kwargs:
            raise ValueError(f"AGC got unknown argument(s): {', '.join(sorted(kwargs))}")
        spec = AGCSpec(clipping=clipping, eps=eps)
        if model is not None and getattr(model, "built", False):
            # The model is known now: a misspelled exclude or unit_axes name is refused
            # here rather than at the first training step. Any weight of the model may be
            # named (a frozen layer's too); which variables are trained, and so need an
            # axis, is known at build, which checks the optimizer's variables again.
            resolve(
                list(model.weights),
                model=model,
                exclude=exclude,
                unit_axes=unit_axes,
                check_axes=False,
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            optimizer = keras.optimizers.get(optimizer)
        super().__init__(learning_rate=0.0, name=name)
        self.agc_spec = spec
        self.inner_optimizer = optimizer
        self._options = _Options(model, exclude, unit_axes)

    @property
    def clipping(self) -> float:
        """The largest allowed ratio of a unit's gradient norm to its weight norm."""
        return self.agc_spec.clipping

    @property
    def eps(self) -> float:
        """The floor under a unit's weight norm."""
        return self.agc_spec.eps

    @property
    def variable_settings(self) -> list[VariableSetting]:
        """How each trainable variable is clipped (known once built): its path, whether
        it is excluded, and its output-unit axes."""
        return list(self._options.settings)

    def build(self, var_list: Sequence[Any]) -> None:
        """Resolve every variable's unit axes (errors surface here), then build the
        wrapped optimizer and make it clip each update."""
        variables = list(var_list)
        options = self._options
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(variables)
        target = hooks.innermost(self.inner_optimizer)
        # Settings follow the variable order of the optimizer that runs the update: the
        # hook finds a variable's setting by that optimizer's own index.
        options.settings = resolve(
            internals.optimizer_variables(target),
            model=options.model,
            exclude=options.exclude,
            unit_axes=options.unit_axes,
        )
        hooks.install(target, lambda: options.settings, self.agc_spec)
        super().build(variables)

    @property
    def variables(self) -> list[Any]:
        """This wrapper's own variables, then the wrapped optimizer's."""
        return list(self._variables) + list(self.inner_optimizer.variables)

    def apply(self, grads: Sequence[Any], trainable_variables: Any = None) -> None:
        """Apply ``grads``: the wrapped optimizer's ``apply``, clipped inside its update."""
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "trainable_variables must be given on the first apply of an unbuilt AGC"
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
        self.inner_optimizer.apply(grads, trainable_variables)

    @property
    def learning_rate(self) -> Any:
        """The wrapped optimizer's learning rate."""
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        """The wrapped optimizer's iteration count."""
        return self.inner_optimizer.iterations

    def scale_loss(self, loss: Any) -> Any:
        """Scale the loss as the wrapped optimizer does (loss scaling)."""
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list: Any) -> None:
        """Let the wrapped optimizer finalise the variables (e.g. its EMA)."""
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict[str, Any]:
        """The wrapped optimizer's config and AGC's settings. Once built, ``exclude`` and
        ``unit_axes`` are recorded per variable path, so a restored AGC needs no model."""
        options = self._options
        config: dict[str, Any] = {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "clipping": self.agc_spec.clipping,
            "eps": self.agc_spec.eps,
        }
        if options.settings:
            names = short_names([s.path for s in options.settings])
            pairs = list(zip(names, options.settings, strict=True))
            config["exclude"] = [name for name, s in pairs if s.excluded]
            config["unit_axes"] = {
                name: _jsonable_axes(s.unit_axes) for name, s in pairs if not s.excluded
            }
            return config
        exclude = options.exclude
        if exclude is None:  # nothing excluded
            items: Sequence[Any] = []
        elif isinstance(exclude, (list, tuple, set)):
            items = list(exclude)
        else:
            items = [exclude]
        config["exclude"] = [describe(item) for item in items]
        if isinstance(options.unit_axes, int) or options.unit_axes is None:
            config["unit_axes"] = options.unit_axes
        else:
            config["unit_axes"] = {
                describe(key): _jsonable_axes(axes) for key, axes in options.unit_axes.items()
            }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> AGC:
        """Rebuild an AGC (and its wrapped optimizer) from :meth:`get_config`."""
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        unit_axes = config.pop("unit_axes", None)
        if isinstance(unit_axes, dict):
            unit_axes = {key: _axes_from_json(axes) for key, axes in unit_axes.items()}
        return cls(inner, unit_axes=unit_axes, **config)


def _jsonable_axes(axes: UnitAxes) -> Any:
    if axes is None or isinstance(axes, int):
        return axes
    return list(axes) if axes else None


def _axes_from_json(axes: Any) -> UnitAxes:
    if isinstance(axes, list):
        return tuple(int(a) for a in axes)
    return axes  # type: ignore[no-any-return]


def _static_shape(x: Any) -> tuple[int | None, ...] | None:
    """``x``'s shape as far as it is known (None for an unknown size; None for an unknown
    rank): of a tensor, a variable, an ``IndexedSlices`` (its dense shape) or an array."""
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    if getattr(shape, "rank", 0) is None:  # a TensorShape of unknown rank
        return None
    return tuple(None if d is None else int(d) for d in shape)


def _check_shape(grad: Any, variable: Any) -> None:
    """Refuse a gradient whose shape is not its variable's (it would broadcast against
    the weight norms, or fail deep inside the backend), with the reference's words
    (``reference.agc_clip``) and the variable's path. Sizes not known yet (a traced
    function's ``None``) are taken to agree."""
    g, w = _static_shape(grad), _static_shape(variable)
    if g is None or w is None:
        return
    differ = len(g) != len(w) or any(
        a is not None and b is not None and a != b for a, b in zip(g, w, strict=True)
    )
    if differ:
        raise ValueError(
            f"grad and weight must share a shape, got {g} and {w} (variable {str(variable.path)!r})"
        )


def adaptive_clip_grad(
    grads: Sequence[Any],
    variables: Sequence[Any],
    model: Any = None,
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Exclude = (),
    unit_axes: UnitAxesOverride = None,
) -> list[Any]:
    """AGC of ``grads`` against ``variables`` (``SPEC.md`` section 5): the clipped
    gradients, in order (Keras tensors are immutable, so nothing is clipped in place).

    The functional form of :class:`AGC`, for custom training loops; the same arguments
    and the same resolution of each variable's output-unit axes (from ``model``'s layers,
    ``exclude``, ``unit_axes``). Excluded variables' gradients come back as they are.
    Call it on the effective gradient: after loss-scale unscaling and all-reduce. Each
    gradient must have its variable's shape (``ValueError`` naming the variable, before
    anything is clipped).

    Example:
        >>> import numpy as np
        >>> fc = keras.layers.Dense(1, use_bias=False)
        >>> fc.build((None, 2))
        >>> _ = fc.kernel.assign(np.ones((2, 1), "float32"))
        >>> g = np.array([[300.0], [400.0]], "float32")
        >>> [np.asarray(c).round(5).tolist() for c in adaptive_clip_grad([g], [fc.kernel], fc)]
        [[[0.00849], [0.01131]]]
    """
    spec = AGCSpec(clipping=clipping, eps=eps)
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
        raise ValueError(
            f"grads and variables must have one entry per variable, got {len(grads)} "
            f"and {len(variables)}"
        )
    for grad, variable in zip(grads, variables, strict=True):
        if grad is not None:
            _check_shape(grad, variable)
    settings = resolve(variables, model=model, exclude=exclude, unit_axes=unit_axes)
    chosen = [k for k, s in enumerate(settings) if not s.excluded and grads[k] is not None]
    clipped = clip_gradients(
        [grads[k] for k in chosen],
        [variables[k] for k in chosen],
        [settings[k].unit_axes for k in chosen],
        spec,
    )
    out = list(grads)
    for k, c in zip(chosen, clipped, strict=True):
        out[k] = c
    return out
