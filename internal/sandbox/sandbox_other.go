//go:build linux && !amd64 && !arm64

package sandbox

const (
	auditArch     = 0 // Worker reports ErrUnsupported
	x32Bit        = 0
	cloneFlagsArg = 0
)

var deniedArch []uintptr
