"""Diffusion math and sampling: the noise schedule and its objectives, the samplers, and the text-to-image
pipeline (guidance, img2img, inpainting) over any denoiser."""
