// moe_down: each token's down projections over its selected experts, summed (the routing
// weights were applied by the gated pass), in one launch (body: moe_expert_core.h).
//// INCLUDE quant_common.h
#define GATED 0
#define MOE_SHARED 0
#define MOE_W2 w
#define MOE_S2 scales
#define MOE_B2 biases
#define MOE_WT(i, shr) 1.0f
#define MOE_SW MOE_W2
#define MOE_SS MOE_S2
#define MOE_SB MOE_B2
#define MOE_SW2 MOE_W2
#define MOE_SS2 MOE_S2
#define MOE_SB2 MOE_B2
//// BODY
//// INCLUDE moe_expert_core.h
