// moe_down_shared_res: moe_down_shared.h with the layer's residual add (input `res`, MOE_RES)
// folded into the output write (body: moe_expert_core.h).
#define MOE_RES 1
//// INCLUDE moe_down_shared.h
