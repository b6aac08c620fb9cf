"""Decoders on an encoder's feature pyramid: Unet (:mod:`.unet`) and FPN (:mod:`.fpn`), each with its head."""
