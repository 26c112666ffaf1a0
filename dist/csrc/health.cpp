// What a process group has done, for the heartbeats and the diagnosis of a
// failure: its Activity and the collective that failed inside C++
// (dist/src/ffi/health.rs).

#include "shim.h"

extern "C" {

// The collective (a VLM_OP_* code) that failed inside C++ on this group
// (in backward or in the reducer), 0 if none.
int32_t vlm_pg_failed_op(vlm_pg* pg) {
  return pg->state->failed_op.load();
}

// A handle on the group's Activity (free with vlm_activity_free), readable
// from any thread, also after the group is gone.
vlm_activity* vlm_pg_activity(vlm_pg* pg) {
  return new vlm_activity{pg->state->activity};
}

// Reads the activity into out[0..6]: entered, last_op, last_ms, waiting,
// waiting_op, waiting_ms.
void vlm_activity_read(vlm_activity* a, int64_t* out) {
  const Activity& x = *a->activity;
  out[0] = static_cast<int64_t>(x.entered.load());
  out[1] = x.last_op.load();
  out[2] = x.last_ms.load();
  out[3] = static_cast<int64_t>(x.waiting.load());
  out[4] = x.waiting_op.load();
  out[5] = x.waiting_ms.load();
}

void vlm_activity_free(vlm_activity* a) {
  delete a;
}

} // extern "C"
