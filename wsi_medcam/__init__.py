"""wsi-medcam."""
