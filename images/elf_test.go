package images

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"
)

func TestSharedDeps(t *testing.T) {
	libs, err := SharedDeps([]string{"/bin/sh"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var bases []string
	for _, l := range libs {
		bases = append(bases, filepath.Base(l))
	}
	for _, want := range []string{"libc.so.6", "ld-linux-x86-64.so.2"} {
		if !slices.Contains(bases, want) {
			t.Errorf("deps of /bin/sh %v lack %s", libs, want)
		}
	}
	if !slices.Contains(libs, "/lib64/ld-linux-x86-64.so.2") {
		t.Errorf("deps %v lack the PT_INTERP loader path", libs)
	}
	if len(libs) != len(slices.Compact(slices.Sorted(slices.Values(libs)))) {
		t.Errorf("duplicates in %v", libs)
	}
}

func TestSharedDepsStatic(t *testing.T) {
	dyn, err := IsDynamic(DefaultBusybox)
	if err != nil {
		t.Fatalf("%v (install busybox-static: make deps)", err)
	}
	if dyn {
		t.Fatalf("%s is dynamic", DefaultBusybox)
	}
	libs, err := SharedDeps([]string{DefaultBusybox}, nil)
	if err != nil || len(libs) != 0 {
		t.Errorf("static busybox needs %v, %v", libs, err)
	}
}

func TestSharedDepsMissing(t *testing.T) {
	_, err := SharedDeps([]string{"/bin/sh"}, []string{t.TempDir()})
	var le *LibraryError
	if !errors.Is(err, ErrNoLibrary) || !errors.As(err, &le) || le.Lib != "libc.so.6" {
		t.Errorf("err %v, want libc.so.6 not found", err)
	}
	if _, err := SharedDeps([]string{"/etc/hostname"}, nil); !errors.As(err, &le) || le.Lib != "" {
		t.Errorf("non-ELF: err %v", err)
	}
}

func TestSplitPath(t *testing.T) {
	got := splitPath([]string{"$ORIGIN/../lib:/opt/x", "${ORIGIN}"}, "/a/bin")
	want := []string{"/a/bin/../lib", "/opt/x", "/a/bin"}
	if !slices.Equal(got, want) {
		t.Errorf("splitPath = %v, want %v", got, want)
	}
}
