package verbstest

import (
	"maps"
	"slices"
)

// Provider names that Config.Provider takes and the deviation list keys on.
const (
	// ProviderSoft is the pure-Go provider (verbs/soft): no deviations.
	ProviderSoft = "soft"
	// ProviderRXE is rdma-core over the Linux 6.1 soft-RoCE driver
	// (verbs/ibv on rdma_rxe).
	ProviderRXE = "rxe"
)

// deviations lists, per provider, the cases it is known not to pass and
// why: each is a documented deviation from the InfiniBand Architecture
// Specification that the provider's own tests pin (the names in
// parentheses), or a limit of the environment it runs in. A provider not
// listed has none: it must pass every case.
var deviations = map[string]map[string]string{
	ProviderRXE: {
		"Window":            "type-2 windows do not bound accesses: rxe checks the region's range only (verbs/ibv TestGuestRXEWindowBounds)",
		"RemoteAccessWrite": "the responder of a refused remote write moves to ERR without IBV_EVENT_QP_ACCESS_ERR (verbs/ibv TestGuestErrors/rkey)",
		"RemoteAccessRead":  "the responder of a refused remote read moves to ERR without IBV_EVENT_QP_ACCESS_ERR",
		"RemoteBounds":      "the responder of an out-of-bounds access moves to ERR without IBV_EVENT_QP_ACCESS_ERR",
		"RemoteBadRKey":     "the responder of an access with an unknown rkey moves to ERR without IBV_EVENT_QP_ACCESS_ERR",
		"BadLKey":           "a bad lkey completes with LOC_QP_OP_ERR instead of LOC_PROT_ERR",
		"LocalLength":       "a receive too short completes with LOC_QP_OP_ERR and REM_OP_ERR instead of LOC_LEN_ERR and REM_INV_REQ_ERR (verbs/ibv TestGuestErrors/length)",
		"RecvProtection":    "a receive without local write completes with LOC_QP_OP_ERR instead of LOC_PROT_ERR",
		"QPErrorFlush":      "the send queue takes more requests than the depth reported, so ErrQueueFull comes late (verbs/ibv TestGuestQueueDepth)",
	},
}

// Deviations returns the known deviations of a provider: case name →
// documented reason. The map is a copy; it is empty for a provider with
// none (ProviderSoft) and for names the suite does not know.
func Deviations(provider string) map[string]string {
	return maps.Clone(deviations[provider])
}

// Deviation returns the documented reason why provider does not pass the
// named case, and whether it is a known deviation.
func Deviation(provider, name string) (string, bool) {
	r, ok := deviations[provider][name]
	return r, ok
}

// Expected lists the cases provider must pass: every case but its known
// deviations, in the order they run.
func Expected(provider string) []string {
	return slices.DeleteFunc(Names(), func(n string) bool {
		_, dev := Deviation(provider, n)
		return dev
	})
}

// KnownDeviationPrefix starts the message of a case skipped as a known
// deviation, so a runner reading test output (a guest's) can tell it from
// any other skip.
const KnownDeviationPrefix = "known deviation of "
