package images

import (
	"fmt"
	"os"
	"path"
	"regexp"
	"strings"
)

// Spec describes a guest initramfs. It is plain data (it round-trips
// through JSON for the vsdp-image command); Builder turns it into an image.
// Every image also holds busybox (static) and a generated /init.
type Spec struct {
	// Name names the image file (build/images/NAME-KEY.cpio): lower-case
	// letters, digits, '.', '_' and '-'.
	Name string `json:"name"`
	// Hostname is the guest's hostname; default Name.
	Hostname string `json:"hostname,omitempty"`
	// Modules are kernel modules /init loads, with their dependencies first
	// (from modules.dep; crc32_generic before rdma_rxe).
	Modules []string `json:"modules,omitempty"`
	// Programs are Go packages of this repository, built for the guest.
	Programs []Program `json:"programs,omitempty"`
	// Binaries are host programs copied to the same path in the guest,
	// with the shared libraries and the loader they need when dynamic.
	Binaries []string `json:"binaries,omitempty"`
	// Libraries are host shared objects a program loads with dlopen (an
	// ibverbs provider, say), copied to the same path with what they need.
	Libraries []string `json:"libraries,omitempty"`
	// Files are extra files.
	Files []File `json:"files,omitempty"`
	// Init holds shell lines /init runs after loading the modules. A line
	// that fails is recorded in /run/vsdp/init-failed.
	Init []string `json:"init,omitempty"`
	// Service is the argv /init runs last, restarting it whenever it exits
	// (the guest agent). Empty: /init powers the guest off after Init.
	Service []string `json:"service,omitempty"`
}

// Program is a Go package of this module built for the guest.
type Program struct {
	// Package is an import path, or a directory relative to the module
	// root starting with "./".
	Package string `json:"package"`
	// Path is where it goes in the guest; default /bin/ + the package's
	// last element (+ ".test" for a test binary).
	Path string `json:"path,omitempty"`
	// CGO builds with cgo; the program is then dynamic and its shared
	// libraries are packed too. Default: CGO_ENABLED=0, static.
	CGO bool `json:"cgo,omitempty"`
	// Test builds the package's test binary (go test -c).
	Test bool `json:"test,omitempty"`
	// Tags are build tags.
	Tags []string `json:"tags,omitempty"`
}

// GuestPath returns where the program goes in the guest.
func (p *Program) GuestPath() string {
	if p.Path != "" {
		return p.Path
	}
	base := path.Base(p.Package)
	if p.Test {
		base += ".test"
	}
	return "/bin/" + base
}

// File is an extra file: the content of a host file, or literal data.
type File struct {
	Path string      `json:"path"`           // guest path
	Host string      `json:"host,omitempty"` // host file to copy
	Data string      `json:"data,omitempty"` // literal content, when Host is ""
	Mode os.FileMode `json:"mode,omitempty"` // permission bits; 0: the host file's, or 0644
	// Deps also packs the shared objects Host (a dynamic ELF file) needs,
	// at their own paths: for a program or library placed at a guest path
	// other than its host path.
	Deps bool `json:"deps,omitempty"`
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// reservedDirs are mount points /init owns; nothing may be packed there.
var reservedDirs = []string{"/proc", "/sys", "/dev", "/run", "/tmp"}

// checkGuestPath accepts an absolute, clean path to a file that /init does
// not own.
func checkGuestPath(p string) error {
	switch {
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("%q is not absolute", p)
	case path.Clean(p) != p:
		return fmt.Errorf("%q is not clean", p)
	case p == "/" || p == "/init":
		return fmt.Errorf("%q is reserved", p)
	case strings.ContainsAny(p, "\x00\n"):
		return fmt.Errorf("%q holds NUL or newline", p)
	}
	for _, d := range reservedDirs {
		if p == d || strings.HasPrefix(p, d+"/") {
			return fmt.Errorf("%q is under %s, which /init mounts", p, d)
		}
	}
	return nil
}

// Validate checks the spec without touching the host.
func (s *Spec) Validate() error {
	if !nameRE.MatchString(s.Name) {
		return &SpecError{Field: "name", Reason: fmt.Sprintf("%q must match %s", s.Name, nameRE)}
	}
	if s.Hostname != "" && !nameRE.MatchString(s.Hostname) {
		return &SpecError{Field: "hostname", Reason: fmt.Sprintf("%q must match %s", s.Hostname, nameRE)}
	}
	for i, m := range s.Modules {
		if m == "" || strings.ContainsAny(m, "/ \t\n\x00") {
			return &SpecError{Field: fmt.Sprintf("modules[%d]", i), Reason: fmt.Sprintf("bad module name %q", m)}
		}
	}
	for i, p := range s.Programs {
		f := fmt.Sprintf("programs[%d]", i)
		if p.Package == "" || strings.ContainsAny(p.Package, " \t\n\x00") || strings.HasPrefix(p.Package, "-") {
			return &SpecError{Field: f, Reason: fmt.Sprintf("bad package %q", p.Package)}
		}
		if err := checkGuestPath(p.GuestPath()); err != nil {
			return &SpecError{Field: f + ".path", Reason: err.Error()}
		}
		for _, t := range p.Tags {
			if t == "" || strings.ContainsAny(t, ", \t\n\x00") {
				return &SpecError{Field: f + ".tags", Reason: fmt.Sprintf("bad tag %q", t)}
			}
		}
	}
	for i, b := range s.Binaries {
		if err := checkGuestPath(b); err != nil {
			return &SpecError{Field: fmt.Sprintf("binaries[%d]", i), Reason: err.Error()}
		}
	}
	for i, l := range s.Libraries {
		if err := checkGuestPath(l); err != nil {
			return &SpecError{Field: fmt.Sprintf("libraries[%d]", i), Reason: err.Error()}
		}
	}
	for i, f := range s.Files {
		field := fmt.Sprintf("files[%d]", i)
		if err := checkGuestPath(f.Path); err != nil {
			return &SpecError{Field: field + ".path", Reason: err.Error()}
		}
		if f.Host != "" && f.Data != "" {
			return &SpecError{Field: field, Reason: "both host and data set"}
		}
		if f.Deps && f.Host == "" {
			return &SpecError{Field: field + ".deps", Reason: "needs a host file"}
		}
		if f.Mode&^os.ModePerm != 0 {
			return &SpecError{Field: field + ".mode", Reason: fmt.Sprintf("%v is not permission bits", f.Mode)}
		}
	}
	for i, l := range s.Init {
		if strings.ContainsRune(l, 0) {
			return &SpecError{Field: fmt.Sprintf("init[%d]", i), Reason: "holds NUL"}
		}
	}
	for i, a := range s.Service {
		if strings.ContainsRune(a, 0) || (i == 0 && a == "") {
			return &SpecError{Field: fmt.Sprintf("service[%d]", i), Reason: fmt.Sprintf("bad argument %q", a)}
		}
	}
	return nil
}

// Merge returns s with o's modules, programs, binaries, libraries, files and
// Init lines appended; s's Name, Hostname and Service are kept unless empty.
// Neither s nor o is modified.
func (s Spec) Merge(o Spec) Spec {
	m := Spec{
		Name:      s.Name,
		Hostname:  s.Hostname,
		Modules:   concat(s.Modules, o.Modules),
		Programs:  concat(s.Programs, o.Programs),
		Binaries:  concat(s.Binaries, o.Binaries),
		Libraries: concat(s.Libraries, o.Libraries),
		Files:     concat(s.Files, o.Files),
		Init:      concat(s.Init, o.Init),
		Service:   concat(s.Service, nil),
	}
	if m.Name == "" {
		m.Name = o.Name
	}
	if m.Hostname == "" {
		m.Hostname = o.Hostname
	}
	if len(m.Service) == 0 {
		m.Service = concat(o.Service, nil)
	}
	return m
}

func concat[T any](a, b []T) []T {
	if len(a)+len(b) == 0 {
		return nil
	}
	return append(append(make([]T, 0, len(a)+len(b)), a...), b...)
}
