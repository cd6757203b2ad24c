"""lmms-eval model classes of the suite, one module per family (registered in `lmms_eval_models.registry`)."""

# model name -> "module.Class" (imported lazily by lmms-eval, so listing models imports no model code)
MODEL_CLASSES: dict[str, str] = {
    "flashvid_llava_onevision": "lmms_eval_models.models.llava_onevision.FlashVIDLlavaOneVision",
    "flashvid_llava_video": "lmms_eval_models.models.llava_video.FlashVIDLlavaVideo",
    "flashvid_qwen2_5_vl": "lmms_eval_models.models.qwen2_5_vl.FlashVIDQwen2_5_VL",
    "flashvid_qwen3_vl": "lmms_eval_models.models.qwen3_vl.FlashVIDQwen3_VL",
}
