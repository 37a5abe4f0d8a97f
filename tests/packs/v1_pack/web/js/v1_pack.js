// A front-end extension of the test pack: registers itself with ComfyUI's app when loaded.
export const V1_PACK_EXTENSION = "v1_pack.extension";
