// Package provider chooses a verbs provider by name, so the daemon and the
// tools need not know which providers this build has: "soft" (verbs/soft,
// pure Go, always there), "ibv" (verbs/ibv, rdma-core over cgo, only in
// linux && cgo builds) and "auto" (ibv when it finds at least one RDMA
// device, soft otherwise).
//
// # Design
//
// Package verbs cannot import its providers, and verbs/soft must not import
// verbs/ibv, so the choice lives here. The ibv provider is linked in by a
// file built only with linux && cgo (ibv_cgo.go); without cgo its stand-in
// reports that the build lacks it, and everything still builds and tests
// with CGO_ENABLED=0.
//
// # Threat model
//
// The name and the soft devices' options come from host configuration,
// which is trusted; an unknown name is an error, never a silent fallback.
// "auto" falls back to soft only when ibv finds no device; an ibv error
// (the kernel refusing the device list) is returned, not hidden.
//
// # Concurrency
//
// Open is safe for concurrent use; it keeps no state.
package provider
