package images

import (
	"errors"
	"fmt"
)

// Sentinel errors. Typed errors below wrap them where one applies.
var (
	// ErrNoKernel: no unpacked kernel in the cache (run `make deps`).
	ErrNoKernel = errors.New("images: no guest kernel in the cache (run `make deps`)")
	// ErrNoModule: a module asked for is neither in modules.dep nor built in.
	ErrNoModule = errors.New("images: no such kernel module")
	// ErrNoLibrary: a shared object a program needs was not found on the host.
	ErrNoLibrary = errors.New("images: shared library not found")
	// ErrSpec: an image spec is invalid.
	ErrSpec = errors.New("images: invalid spec")
	// ErrTool: a host tool the build needs is missing or failed.
	ErrTool = errors.New("images: host tool failed")
)

// DepError reports a malformed modules.dep line.
type DepError struct {
	Line   int
	Reason string
}

func (e *DepError) Error() string {
	return fmt.Sprintf("images: modules.dep line %d: %s", e.Line, e.Reason)
}

// ModuleError reports a module that cannot be resolved.
type ModuleError struct {
	Module string
	Reason string
	Err    error // ErrNoModule or nil
}

func (e *ModuleError) Error() string {
	return fmt.Sprintf("images: module %s: %s", e.Module, e.Reason)
}

func (e *ModuleError) Unwrap() error { return e.Err }

// LibraryError reports a shared object that an ELF file needs and that was
// not found, or an ELF file that cannot be read.
type LibraryError struct {
	Object string // the file that needs it
	Lib    string // DT_NEEDED name, or "" when Object itself is unreadable
	Err    error
}

func (e *LibraryError) Error() string {
	if e.Lib == "" {
		return fmt.Sprintf("images: %s: %v", e.Object, e.Err)
	}
	return fmt.Sprintf("images: %s needs %s: %v", e.Object, e.Lib, e.Err)
}

func (e *LibraryError) Unwrap() error { return e.Err }

// SpecError reports an invalid field of a Spec.
type SpecError struct {
	Field  string
	Reason string
}

func (e *SpecError) Error() string {
	return fmt.Sprintf("images: spec %s: %s", e.Field, e.Reason)
}

func (e *SpecError) Unwrap() error { return ErrSpec }

// ToolError reports a host tool (apt-get, dpkg, depmod, go) that failed.
type ToolError struct {
	Tool   string
	Args   []string
	Output string // tail of its combined output
	Err    error
}

func (e *ToolError) Error() string {
	msg := fmt.Sprintf("images: %s %v: %v", e.Tool, e.Args, e.Err)
	if e.Output != "" {
		msg += "\n" + e.Output
	}
	return msg
}

func (e *ToolError) Unwrap() []error { return []error{ErrTool, e.Err} }
