// moe_gate_up: for each (token, slot) pair, weight * silu(x . Wg) * (x . Wu) over the selected
// expert's gate and up rows, one pass over both (body: moe_expert_core.h).
//// INCLUDE quant_common.h
#define GATED 1
#define MOE_SHARED 0
#define MOE_W2 w2
#define MOE_S2 scales2
#define MOE_B2 biases2
#define MOE_WT(i, shr) ((shr) ? 1.0f : float(wts[i]))
#define MOE_SW MOE_W2
#define MOE_SS MOE_S2
#define MOE_SB MOE_B2
#define MOE_SW2 MOE_W2
#define MOE_SS2 MOE_S2
#define MOE_SB2 MOE_B2
//// BODY
//// INCLUDE moe_expert_core.h
