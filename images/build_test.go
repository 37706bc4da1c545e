package images

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cavaliergopher/cpio"
)

// fakeKernel makes a kernel cache with two modules (b needs a).
func fakeKernel(t *testing.T) *Kernel {
	t.Helper()
	dir := t.TempDir()
	pkg, ver := "linux-image-1.0-test", "1.0-test"
	root := filepath.Join(dir, pkg)
	files := map[string]string{
		completeFile:                                pkg,
		"boot/vmlinuz-" + ver:                       "kernel",
		"lib/modules/" + ver + "/modules.dep":       "kernel/a/a.ko:\nkernel/b/b.ko: kernel/a/a.ko\n",
		"lib/modules/" + ver + "/modules.builtin":   "kernel/lib/crc32.ko\n",
		"lib/modules/" + ver + "/kernel/a/a.ko":     "module a",
		"lib/modules/" + ver + "/kernel/b/b.ko":     "module b",
		"lib/modules/" + ver + "/kernel/c/c.ko.xz":  "xz",
		"lib/modules/" + ver + "/kernel/d/ddd.ko":   "unlisted",
		"lib/modules/" + ver + "/modules.order":     "",
		"lib/modules/" + ver + "/modules.alias":     "",
		"lib/modules/" + ver + "/modules.symbols":   "",
		"lib/modules/" + ver + "/modules.devname":   "",
		"lib/modules/" + ver + "/modules.softdep":   "",
		"lib/modules/" + ver + "/modules.builtin.b": "",
	}
	for p, c := range files {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, currentFile), []byte(pkg+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k, err := LoadKernel(dir)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

type member struct {
	mode cpio.FileMode
	data []byte
	link string
}

func readArchive(t *testing.T, path string) map[string]member {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := make(map[string]member)
	r := cpio.NewReader(f)
	for {
		h, err := r.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := out[h.Name]; dup {
			t.Errorf("%s twice in the archive", h.Name)
		}
		out[h.Name] = member{mode: h.Mode, data: data, link: h.Linkname}
	}
}

func TestLoadKernelMissing(t *testing.T) {
	if _, err := LoadKernel(t.TempDir()); !errors.Is(err, ErrNoKernel) {
		t.Errorf("err %v, want ErrNoKernel", err)
	}
	k := fakeKernel(t)
	os.Remove(filepath.Join(k.Root, completeFile))
	if _, err := LoadKernel(filepath.Dir(k.Root)); !errors.Is(err, ErrNoKernel) {
		t.Errorf("incomplete unpack: err %v, want ErrNoKernel", err)
	}
	if _, err := kernelVersion("linux-image-amd64"); err == nil {
		t.Error("metapackage accepted as a kernel package")
	}
}

func TestBuild(t *testing.T) {
	k := fakeKernel(t)
	root, err := FindModuleRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	host := filepath.Join(t.TempDir(), "host.txt")
	os.WriteFile(host, []byte("from the host"), 0o640)
	b := &Builder{Kernel: k, Root: root, Dir: t.TempDir()}
	spec := &Spec{
		Name:     "test-img",
		Modules:  []string{"b", "crc32"},
		Binaries: []string{"/bin/dash"},
		Files: []File{
			{Path: "/etc/motd", Data: "hello"},
			{Path: "/etc/host.txt", Host: host},
			{Path: "/etc/secret", Data: "s", Mode: 0o600},
		},
		Init:    []string{"echo one", "echo 'two'"},
		Service: []string{"/bin/sh", "-c", "echo it's up"},
	}
	ctx := context.Background()
	img, err := b.Build(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if img.Cached {
		t.Error("first build reported cached")
	}
	if want := []string{"kernel/a/a.ko", "kernel/b/b.ko"}; strings.Join(img.Modules, " ") != strings.Join(want, " ") {
		t.Errorf("modules %v, want %v", img.Modules, want)
	}
	m := readArchive(t, img.Path)
	if len(m) != img.Files {
		t.Errorf("archive holds %d entries, Image.Files says %d", len(m), img.Files)
	}
	bb, _ := os.ReadFile(DefaultBusybox)
	check := func(name, data string, mode cpio.FileMode) {
		t.Helper()
		e, ok := m[name]
		switch {
		case !ok:
			t.Errorf("%s missing", name)
		case data != "" && sha256.Sum256(e.data) != sha256.Sum256([]byte(data)):
			t.Errorf("%s: content differs (%d bytes)", name, len(e.data))
		case e.mode != mode:
			t.Errorf("%s: mode %o, want %o", name, e.mode, mode)
		}
	}
	check("bin/busybox", string(bb), cpio.TypeReg|0o755)
	check("etc/motd", "hello", cpio.TypeReg|0o644)
	check("etc/host.txt", "from the host", cpio.TypeReg|0o640)
	check("etc/secret", "s", cpio.TypeReg|0o600)
	check("lib/modules/1.0-test/kernel/a/a.ko", "module a", cpio.TypeReg|0o644)
	check("lib/modules/1.0-test/kernel/b/b.ko", "module b", cpio.TypeReg|0o644)
	check("lib", "", cpio.TypeDir|0o755)
	check("proc", "", cpio.TypeDir|0o755)
	check("init", "", cpio.TypeReg|0o755)
	if _, ok := m["lib/modules/1.0-test/kernel/d/ddd.ko"]; ok {
		t.Error("an unrequested module was packed")
	}
	if e := m["bin/sh"]; e.mode != cpio.TypeSymlink|0o777 || e.link != "busybox" {
		t.Errorf("bin/sh = %+v, want a symlink to busybox", e)
	}
	if e := m["bin/dash"]; !bytes.HasPrefix(e.data, []byte("\x7fELF")) || e.mode != cpio.TypeReg|0o755 {
		t.Errorf("bin/dash not packed as the host's program (mode %o)", e.mode)
	}
	libc := false
	for name := range m {
		libc = libc || strings.HasSuffix(name, "/libc.so.6")
	}
	if !libc {
		t.Error("libc of /bin/dash not packed")
	}
	init := string(m["init"].data)
	ia, ib := strings.Index(init, "kernel/a/a.ko"), strings.Index(init, "kernel/b/b.ko")
	if ia < 0 || ib < ia {
		t.Errorf("/init loads b before a:\n%s", init)
	}
	for _, want := range []string{"echo one", `'/bin/sh' '-c' 'echo it'\''s up'`, InitFailedFile, "hostname 'test-img'", InitReadyMessage} {
		if !strings.Contains(init, want) {
			t.Errorf("/init lacks %q:\n%s", want, init)
		}
	}

	// A dynamic host file at a guest path of its own (Deps): its
	// libraries come along, even from under /tmp on the host.
	dash := filepath.Join(t.TempDir(), "mydash")
	if b, err := os.ReadFile("/bin/dash"); err != nil {
		t.Fatal(err)
	} else if err := os.WriteFile(dash, b, 0o755); err != nil {
		t.Fatal(err)
	}
	imgDeps, err := b.Build(ctx, &Spec{Name: "deps", Files: []File{{Path: "/opt/dash", Host: dash, Deps: true}}})
	if err != nil {
		t.Fatal(err)
	}
	mDeps := readArchive(t, imgDeps.Path)
	libc = false
	for name := range mDeps {
		libc = libc || strings.HasSuffix(name, "/libc.so.6")
	}
	if _, ok := mDeps["opt/dash"]; !ok || !libc {
		t.Errorf("Deps: opt/dash packed %v, its libc packed %v", ok, libc)
	}

	// Unchanged: cached, same file, quick.
	st0, _ := os.Stat(img.Path)
	start := time.Now()
	img2, err := b.Build(ctx, spec)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if !img2.Cached || img2.Path != img.Path || img2.Key != img.Key {
		t.Errorf("rebuild: cached %v, path %s (was %s)", img2.Cached, img2.Path, img.Path)
	}
	if st, _ := os.Stat(img.Path); !os.SameFile(st0, st) {
		t.Error("cached image was rewritten")
	}
	t.Logf("cached build took %v", took)

	// A changed input makes a new image.
	os.WriteFile(host, []byte("changed"), 0o640)
	img3, err := b.Build(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if img3.Cached || img3.Key == img.Key {
		t.Errorf("changed input: cached %v, same key %v", img3.Cached, img3.Key == img.Key)
	}
	if _, err := os.Stat(img.Path); err != nil {
		t.Errorf("the older image was pruned at once: %v", err)
	}
}

func TestBuildErrors(t *testing.T) {
	k := fakeKernel(t)
	b := &Builder{Kernel: k, Dir: t.TempDir()}
	ctx := context.Background()
	tests := []struct {
		name string
		spec Spec
		want error
	}{
		{"invalid", Spec{Name: ""}, ErrSpec},
		{"unknown module", Spec{Name: "x", Modules: []string{"zzz"}}, ErrNoModule},
		{"base conflict", Spec{Name: "x", Binaries: []string{"/bin/sh"}}, ErrSpec},
		{"conflict", Spec{Name: "x", Files: []File{{Path: "/etc/a", Data: "1"}, {Path: "/etc/a", Data: "2"}}}, ErrSpec},
		{"file under file", Spec{Name: "x", Files: []File{{Path: "/etc/a", Data: "1"}, {Path: "/etc/a/b", Data: "2"}}}, ErrSpec},
		{"missing host file", Spec{Name: "x", Files: []File{{Path: "/etc/a", Host: "/no/such/file"}}}, os.ErrNotExist},
		{"missing binary", Spec{Name: "x", Binaries: []string{"/no/such/bin"}}, os.ErrNotExist},
		{"bad package", Spec{Name: "x", Programs: []Program{{Package: "./no/such/package"}}}, ErrTool},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := b.Build(ctx, &tt.spec); !errors.Is(err, tt.want) {
				t.Errorf("err %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := (&Builder{Dir: t.TempDir()}).Build(ctx, &Spec{Name: "x", Modules: []string{"a"}}); !errors.Is(err, ErrSpec) {
		t.Errorf("modules without a kernel: err %v", err)
	}
	k2 := *k
	if _, err := os.Stat(filepath.Join(k.ModuleDir(), "kernel/c/c.ko.xz")); err == nil {
		os.WriteFile(filepath.Join(k.ModuleDir(), "modules.dep"), []byte("kernel/c/c.ko.xz:\n"), 0o644)
		var me *ModuleError
		if _, err := (&Builder{Kernel: &k2, Dir: t.TempDir()}).Build(ctx, &Spec{Name: "x", Modules: []string{"c"}}); !errors.As(err, &me) {
			t.Errorf("compressed module: err %v, want *ModuleError", err)
		}
	}
}

func TestBuildProgram(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a Go program")
	}
	b := &Builder{Dir: t.TempDir()}
	spec := &Spec{Name: "prog", Programs: []Program{{Package: "./cmd/vsdp-image", Path: "/sbin/vsdp-image"}}}
	img, err := b.Build(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	m := readArchive(t, img.Path)
	e, ok := m["sbin/vsdp-image"]
	if !ok || e.mode != cpio.TypeReg|0o755 || !bytes.HasPrefix(e.data, []byte("\x7fELF")) {
		t.Fatalf("program entry %v %o", ok, e.mode)
	}
	tmp := filepath.Join(t.TempDir(), "p")
	os.WriteFile(tmp, e.data, 0o755)
	if dyn, err := IsDynamic(tmp); err != nil || dyn {
		t.Errorf("program is dynamic (%v, %v); CGO_ENABLED=0 builds must be static", dyn, err)
	}
	start := time.Now()
	img2, err := b.Build(context.Background(), spec)
	if err != nil || !img2.Cached {
		t.Errorf("rebuild: %v, cached %v", err, img2 != nil && img2.Cached)
	}
	t.Logf("cached build with one Go program took %v", time.Since(start))
}
