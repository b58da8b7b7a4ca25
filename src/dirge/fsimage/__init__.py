"""Writers of whole-image formats: erofs images, flattened tars; mounting erofs images."""
