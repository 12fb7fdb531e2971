from .deeplab import DeepLabV3Plus, build_model, convert_sync_bn

__all__ = ["DeepLabV3Plus", "build_model", "convert_sync_bn"]
