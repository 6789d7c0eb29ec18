// moe_down_shared_res: moe_down_shared.h with the layer's residual add (input `res`, MOE_RES)
// folded into the output write (body: moe_expert_core.h).
//// INCLUDE quant_common.h
#define GATED 0
#define MOE_SHARED 1
#define MOE_RES 1
#define MOE_W2 w
#define MOE_S2 scales
#define MOE_B2 biases
#define MOE_WT(i, shr) 1.0f
#define MOE_SW sw
#define MOE_SS sscales
#define MOE_SB sbiases
#define MOE_SW2 sw
#define MOE_SS2 sscales
#define MOE_SB2 sbiases
//// BODY
//// INCLUDE moe_expert_core.h
