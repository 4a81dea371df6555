"""Docstring fragments shared by the KOALA optimizers (as torch/optim/optimizer.py does for its optimizers)."""

LOSS_PATHS = r"""
    The loss reaches the filter in one of three equivalent ways::

        # 1. a closure (zero grads, forward, backward on the mean, return the loss)
        def closure():
            opt.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()
            return losses
        opt.step(closure)

        # 2. by keyword, after backward
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses)

        # 3. the papers' API
        opt.predict()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.update(losses.mean(), losses.square().mean())

    A 0-d loss (the batch mean) works too, and so do a Python number and a one-element tensor of any shape (as
    torch.optim's closures return); per-sample losses let R be estimated from their spread.
"""

COMMON_ARGS = r"""
        r (float, optional): fixed measurement noise R; ``None`` estimates it online as an exponential average
            of ``r_stat`` (see :mod:`kalmanopt.optim.noise`). Default: ``None`` for KOALA-V, KOALA-M and KOALA++'s
            ``preset="paper"``; ``0`` for KOALA++'s default preset (its step cap bounds the gain instead).
        alpha_r (float, optional): coefficient of that average (default: 0.9).
        weight_decay (float, optional): coupled L2 penalty: the filter sees the gradient ``g + wd * theta`` and the
            per-tensor residual ``L + wd/2 * ||theta||^2`` (default: 0).
        r_stat (str, optional): the loss statistic R averages: ``"second_moment"`` (default), ``"squared_mean"``
            or ``"mean_variance"``.
        r_clip (float or None, optional): outlier guard of that average: the statistic *stored* into it is clipped
            at ``r_clip`` times the previous R (not at the first measurement; the step itself uses the unclipped
            average), so one outlier loss does not stall the filter for hundreds of steps (default: 100).
            ``None`` is the papers' average bit for bit. See :mod:`kalmanopt.optim.noise`.
        foreach (bool, optional): use the multi-tensor fast path (default: ``None``, i.e. on for CPU and CUDA
            tensors). ``False`` selects the readable single-tensor reference.
        process_group (optional): the data-parallel group whose loss statistics are summed when
            ``torch.distributed`` is initialised (default: the world).
"""

GUARDS = r"""
    Bad input never corrupts the filter: a non-finite loss, loss statistic or gradient, a loss whose statistic does
    not fit the state dtype, or an update that would not fit where it is stored skips the whole step without a host
    synchronisation (parameters and state stay bit-for-bit unchanged; ``skipped_steps`` in the group state counts
    the skips). Non-finite hyperparameters raise ``ValueError``, also when a param group is changed between steps,
    and so does anything else construction refuses (a None, a string, a tensor of several elements), before anything
    is written. A tensor hyperparameter is checked on the device instead (a non-finite one skips the step); one
    element in any shape (``torch.tensor([[0.5]])``) is taken as that number, as torch.optim does. A tensor whose
    gradient is ``None`` is not corrected (KOALA-M's prediction still moves it by its velocity); an exactly zero
    gradient is not corrected either without weight decay, but with ``weight_decay > 0`` the filter sees
    ``wd * theta`` and moves the tensor toward zero, as weight decay does.
"""
