"""Training: the engine that runs the stages of one experiment, and the interface methods use.

* :mod:`aimm.training.context`: :class:`Stage`, :class:`TrainContext` (what a method may touch)
  and the callback protocol (:func:`notify`);
* :mod:`aimm.training.loop`: one stage's inner loop, the NaN policy, checkpoint timing and the
  one :func:`~aimm.training.loop.optimizer_step` that inner and rehearsal steps share;
* :mod:`aimm.training.artifacts`: evaluate, then write the stage folder and the result set;
* :mod:`aimm.training.state`: :class:`RunState`, the resume point (``state.json``);
* :mod:`aimm.training.engine`: orchestration (``run``, ``Engine``, ``RESUME_FREE_FIELDS``).

This package file imports nothing, so ``aimm.methods.base`` can import the context without
loading the engine (which imports the methods).
"""
