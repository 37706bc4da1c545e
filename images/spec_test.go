package images

import (
	"errors"
	"slices"
	"testing"
)

func TestSpecValidate(t *testing.T) {
	tests := []struct {
		name string
		mod  func(s *Spec)
		want string // field named in the error; "" means valid
	}{
		{"ok", func(s *Spec) {}, ""},
		{"empty name", func(s *Spec) { s.Name = "" }, "name"},
		{"upper name", func(s *Spec) { s.Name = "Vm" }, "name"},
		{"slash name", func(s *Spec) { s.Name = "a/b" }, "name"},
		{"bad hostname", func(s *Spec) { s.Hostname = "a b" }, "hostname"},
		{"module slash", func(s *Spec) { s.Modules = []string{"kernel/x.ko"} }, "modules[0]"},
		{"module empty", func(s *Spec) { s.Modules = []string{""} }, "modules[0]"},
		{"program empty", func(s *Spec) { s.Programs = []Program{{}} }, "programs[0]"},
		{"program flag", func(s *Spec) { s.Programs = []Program{{Package: "-x"}} }, "programs[0]"},
		{"program path", func(s *Spec) { s.Programs = []Program{{Package: "./a", Path: "bin/a"}} }, "programs[0].path"},
		{"program tag", func(s *Spec) { s.Programs = []Program{{Package: "./a", Tags: []string{"a,b"}}} }, "programs[0].tags"},
		{"binary relative", func(s *Spec) { s.Binaries = []string{"usr/bin/x"} }, "binaries[0]"},
		{"library unclean", func(s *Spec) { s.Libraries = []string{"/usr/../lib/x.so"} }, "libraries[0]"},
		{"file init", func(s *Spec) { s.Files = []File{{Path: "/init"}} }, "files[0].path"},
		{"file root", func(s *Spec) { s.Files = []File{{Path: "/"}} }, "files[0].path"},
		{"file proc", func(s *Spec) { s.Files = []File{{Path: "/proc/x"}} }, "files[0].path"},
		{"file run", func(s *Spec) { s.Files = []File{{Path: "/run"}} }, "files[0].path"},
		{"file newline", func(s *Spec) { s.Files = []File{{Path: "/a\nb"}} }, "files[0].path"},
		{"file both", func(s *Spec) { s.Files = []File{{Path: "/a", Host: "/b", Data: "c"}} }, "files[0]"},
		{"file mode", func(s *Spec) { s.Files = []File{{Path: "/a", Mode: 0o40755}} }, "files[0].mode"},
		{"file ok", func(s *Spec) { s.Files = []File{{Path: "/etc/x", Data: "y", Mode: 0o600}} }, ""},
		{"file deps without host", func(s *Spec) { s.Files = []File{{Path: "/a", Data: "y", Deps: true}} }, "files[0].deps"},
		{"file deps", func(s *Spec) { s.Files = []File{{Path: "/a", Host: "/tmp/b", Deps: true}} }, ""},
		{"init NUL", func(s *Spec) { s.Init = []string{"a\x00"} }, "init[0]"},
		{"service empty", func(s *Spec) { s.Service = []string{""} }, "service[0]"},
		{"service NUL", func(s *Spec) { s.Service = []string{"a", "b\x00"} }, "service[1]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := Spec{Name: "vm-1.x_y"}
			tt.mod(&s)
			err := s.Validate()
			if tt.want == "" {
				if err != nil {
					t.Errorf("unexpected %v", err)
				}
				return
			}
			var se *SpecError
			if !errors.As(err, &se) || se.Field != tt.want || !errors.Is(err, ErrSpec) {
				t.Errorf("err %v, want a SpecError for %s", err, tt.want)
			}
		})
	}
}

func TestProgramGuestPath(t *testing.T) {
	for _, tt := range []struct {
		p    Program
		want string
	}{
		{Program{Package: "github.com/vsdp/vsdp/vmtest/agent"}, "/bin/agent"},
		{Program{Package: "./verbs/ibv", Test: true}, "/bin/ibv.test"},
		{Program{Package: "./x", Path: "/sbin/y"}, "/sbin/y"},
	} {
		if got := tt.p.GuestPath(); got != tt.want {
			t.Errorf("%+v: %q, want %q", tt.p, got, tt.want)
		}
	}
}

func TestMerge(t *testing.T) {
	a := Spec{Name: "a", Modules: []string{"m1"}, Init: []string{"i1"}}
	b := Spec{Name: "b", Hostname: "h", Modules: []string{"m2"}, Binaries: []string{"/x"}, Service: []string{"s"}}
	m := a.Merge(b)
	if m.Name != "a" || m.Hostname != "h" || !slices.Equal(m.Modules, []string{"m1", "m2"}) ||
		!slices.Equal(m.Binaries, []string{"/x"}) || !slices.Equal(m.Service, []string{"s"}) || !slices.Equal(m.Init, []string{"i1"}) {
		t.Errorf("merge %+v", m)
	}
	m.Modules[0] = "changed"
	if a.Modules[0] != "m1" {
		t.Error("Merge aliases its receiver's slices")
	}
}
