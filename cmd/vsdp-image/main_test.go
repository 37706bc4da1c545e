package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	ctx := context.Background()
	var out, errOut bytes.Buffer
	if err := run(ctx, nil, &out, &errOut); !errors.Is(err, flag.ErrHelp) || !strings.Contains(errOut.String(), "usage") {
		t.Errorf("no args: %v %q", err, errOut.String())
	}
	if err := run(ctx, []string{"frobnicate"}, &out, &errOut); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("unknown command: %v", err)
	}
	out.Reset()
	if err := run(ctx, []string{"libs", "/bin/dash"}, &out, &errOut); err != nil || !strings.Contains(out.String(), "libc.so.6") {
		t.Errorf("libs: %v %q", err, out.String())
	}

	dir := t.TempDir()
	spec := filepath.Join(dir, "spec.json")
	os.WriteFile(spec, []byte(`{"name":"cli-test","files":[{"path":"/etc/x","data":"y"}]}`), 0o644)
	out.Reset()
	if err := run(ctx, []string{"build", "-spec", spec, "-dir", dir}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	img := strings.TrimSpace(out.String())
	if filepath.Dir(img) != dir || !strings.HasPrefix(filepath.Base(img), "cli-test-") {
		t.Errorf("image path %q", img)
	}
	if _, err := os.Stat(img); err != nil {
		t.Error(err)
	}
	os.WriteFile(spec, []byte(`{"name":"cli-test","bogus":1}`), 0o644)
	if err := run(ctx, []string{"build", "-spec", spec, "-dir", dir}, &out, &errOut); err == nil {
		t.Error("unknown spec field accepted")
	}
	if err := run(ctx, []string{"build"}, &out, &errOut); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("build without -spec: %v", err)
	}
}
