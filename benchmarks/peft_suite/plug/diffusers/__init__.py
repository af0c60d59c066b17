class StableDiffusionPipeline:
    pass
