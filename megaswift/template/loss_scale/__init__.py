from .base import BASE_STRATEGIES, LossScale, loss_scales


def get_loss_scale(spec: str) -> LossScale:
    """``'default'``, ``'last_round'``, ``'all'`` (named scales and chaining land with the loss-scale work)."""
    if spec in BASE_STRATEGIES:
        return LossScale(spec)
    raise ValueError(f"unknown loss_scale '{spec}'")


__all__ = ['BASE_STRATEGIES', 'LossScale', 'loss_scales', 'get_loss_scale']
