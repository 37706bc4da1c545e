package images

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/cavaliergopher/cpio"
)

// formatVersion is part of every cache key: bump it when the image layout
// or the /init template changes so that cached images are rebuilt.
const formatVersion = "vsdp-image-1"

// DefaultBusybox is the static busybox of Debian's busybox-static package.
const DefaultBusybox = "/bin/busybox"

// keepUnused is how long an image that no build asked for stays in the cache
// beside a newer image of the same name; keepAny is how long any unused image
// stays.
const (
	keepUnused = time.Hour
	keepAny    = 7 * 24 * time.Hour
)

// Builder builds images from specs and caches them by content.
type Builder struct {
	// Kernel supplies the modules; required when a spec names modules.
	Kernel *Kernel
	// Root is the module root for Programs; "" finds it from the working
	// directory (the nearest go.mod).
	Root string
	// Dir is the image cache; "" means Root/build/images.
	Dir string
	// Busybox is the static busybox to pack; "" means DefaultBusybox.
	Busybox string
	// LibDirs are the library search directories; nil means DefaultLibDirs.
	LibDirs []string
	// Go is the go command for Programs; "" finds it (PATH, then GOROOT).
	Go string
}

// Image is a built (or cached) initramfs.
type Image struct {
	Path    string   // the uncompressed newc cpio archive, for -initrd
	Key     string   // hex sha256 of the image's manifest
	Cached  bool     // true when an identical image was already built
	Modules []string // module files /init loads, in order
	Files   int      // entries in the archive
}

// entry is one archive member; exactly one of data, link is used for
// regular files and symlinks; directories have neither.
type entry struct {
	name string // archive name, no leading '/'
	mode cpio.FileMode
	data []byte
	link string
	from string // where it came from, for error messages
}

// FindModuleRoot returns the nearest directory at or above dir that holds a
// go.mod file.
func FindModuleRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("images: no go.mod above the working directory")
		}
		dir = parent
	}
}

func (b *Builder) paths() (root, dir string, err error) {
	root = b.Root
	if root == "" {
		wd, err := os.Getwd()
		if err != nil {
			return "", "", err
		}
		if root, err = FindModuleRoot(wd); err != nil {
			return "", "", err
		}
	}
	dir = b.Dir
	if dir == "" {
		dir = filepath.Join(root, "build", "images")
	}
	return root, dir, nil
}

// Build returns the image for spec, building it only when no image with the
// same content is cached.
func (b *Builder) Build(ctx context.Context, spec *Spec) (*Image, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	root, dir, err := b.paths()
	if err != nil {
		return nil, err
	}
	m := newManifest()
	img := &Image{}

	busybox := b.Busybox
	if busybox == "" {
		busybox = DefaultBusybox
	}
	if dyn, err := IsDynamic(busybox); err != nil {
		return nil, &LibraryError{Object: busybox, Err: err}
	} else if dyn {
		return nil, &SpecError{Field: "busybox", Reason: busybox + " is dynamically linked (install busybox-static)"}
	}
	if err := m.addHost("/bin/busybox", busybox, 0o755); err != nil {
		return nil, err
	}
	m.addLink("/bin/sh", "busybox")

	if len(spec.Modules) > 0 {
		if b.Kernel == nil {
			return nil, &SpecError{Field: "modules", Reason: "no kernel given to the builder"}
		}
		deps, err := b.Kernel.Deps()
		if err != nil {
			return nil, err
		}
		if img.Modules, err = deps.Resolve(spec.Modules); err != nil {
			return nil, err
		}
		for _, rel := range img.Modules {
			if strings.HasSuffix(rel, ".xz") || strings.HasSuffix(rel, ".zst") || strings.HasSuffix(rel, ".gz") {
				return nil, &ModuleError{Module: ModuleName(rel), Reason: "compressed module; busybox insmod needs plain .ko files"}
			}
			guest := path.Join("/lib/modules", b.Kernel.Version, rel)
			if err := m.addHost(guest, filepath.Join(b.Kernel.ModuleDir(), filepath.FromSlash(rel)), 0o644); err != nil {
				return nil, err
			}
		}
	}

	var dynamic []string // host paths whose shared libraries we need
	for i := range spec.Programs {
		p := &spec.Programs[i]
		bin, err := b.buildProgram(ctx, root, dir, p)
		if err != nil {
			return nil, err
		}
		m.add(entry{name: p.GuestPath(), mode: cpio.TypeReg | 0o755, data: bin, from: p.Package})
		if p.CGO {
			tmp, err := writeTemp(dir, bin)
			if err != nil {
				return nil, err
			}
			defer os.Remove(tmp)
			dynamic = append(dynamic, tmp)
		}
	}
	for _, bin := range spec.Binaries {
		if err := m.addHost(bin, bin, 0); err != nil {
			return nil, err
		}
		dynamic = append(dynamic, bin)
	}
	for _, lib := range spec.Libraries {
		if err := m.addHost(lib, lib, 0); err != nil {
			return nil, err
		}
		dynamic = append(dynamic, lib)
	}
	for _, f := range spec.Files {
		if f.Deps {
			dynamic = append(dynamic, f.Host)
		}
	}
	if len(dynamic) > 0 {
		libs, err := SharedDeps(dynamic, b.LibDirs)
		if err != nil {
			return nil, err
		}
		for _, l := range libs {
			if err := m.addHost(l, l, 0); err != nil {
				return nil, err
			}
		}
	}
	for _, f := range spec.Files {
		if f.Host != "" {
			if err := m.addHost(f.Path, f.Host, f.Mode); err != nil {
				return nil, err
			}
			continue
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o644
		}
		m.add(entry{name: f.Path, mode: cpio.TypeReg | cpio.FileMode(mode.Perm()), data: []byte(f.Data), from: "data"})
	}
	var kver string
	if b.Kernel != nil {
		kver = b.Kernel.Version
	}
	m.add(entry{name: "/init", mode: cpio.TypeReg | 0o755, data: []byte(InitScript(spec, kver, img.Modules)), from: "init"})
	for _, d := range []string{"/proc", "/sys", "/dev", "/run", "/tmp", "/etc", "/root", "/usr/bin", "/usr/sbin", "/sbin"} {
		m.addDir(d)
	}
	if m.err != nil {
		return nil, m.err
	}

	entries := m.sorted()
	img.Files = len(entries)
	img.Key = manifestKey(entries)
	img.Path = filepath.Join(dir, spec.Name+"-"+img.Key[:20]+".cpio")
	if _, err := os.Stat(img.Path); err == nil {
		img.Cached = true
		now := time.Now()
		os.Chtimes(img.Path, now, now) // mark it used, for pruning
		return img, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if err := writeArchive(img.Path, entries); err != nil {
		return nil, err
	}
	pruneImages(dir, spec.Name, img.Path)
	return img, nil
}

// manifest collects archive entries keyed by guest path.
type manifest struct {
	entries map[string]entry
	err     error
}

func newManifest() *manifest { return &manifest{entries: make(map[string]entry)} }

// add records e and its parent directories. A path given twice with
// different content is an error (the first error sticks).
func (m *manifest) add(e entry) {
	e.name = strings.TrimPrefix(path.Clean(e.name), "/")
	if old, ok := m.entries[e.name]; ok {
		if old.mode != e.mode || old.link != e.link || string(old.data) != string(e.data) {
			if m.err == nil {
				m.err = &SpecError{Field: "/" + e.name, Reason: fmt.Sprintf("given twice with different content (%s, %s)", old.from, e.from)}
			}
		}
		return
	}
	m.entries[e.name] = e
	for d := path.Dir(e.name); d != "." && d != "/"; d = path.Dir(d) {
		if old, ok := m.entries[d]; ok {
			if !old.mode.IsDir() && m.err == nil {
				m.err = &SpecError{Field: "/" + d, Reason: "is a file and a directory"}
			}
			break
		}
		m.entries[d] = entry{name: d, mode: cpio.TypeDir | 0o755, from: "parent of " + e.name}
	}
}

func (m *manifest) addDir(p string) { m.add(entry{name: p, mode: cpio.TypeDir | 0o755, from: "base"}) }

func (m *manifest) addLink(p, target string) {
	m.add(entry{name: p, mode: cpio.TypeSymlink | 0o777, link: target, from: "base"})
}

// addHost records a host file's content (symbolic links followed) at a guest
// path; mode 0 keeps the host file's permission bits.
func (m *manifest) addHost(guest, host string, mode os.FileMode) error {
	data, err := os.ReadFile(host)
	if err != nil {
		return fmt.Errorf("images: %s: %w", guest, err)
	}
	if mode == 0 {
		st, err := os.Stat(host)
		if err != nil {
			return err
		}
		mode = st.Mode().Perm()
	}
	m.add(entry{name: guest, mode: cpio.TypeReg | cpio.FileMode(mode.Perm()), data: data, from: host})
	return nil
}

// sorted returns the entries by name, so every directory precedes what it
// holds and equal content gives equal archives.
func (m *manifest) sorted() []entry {
	out := make([]entry, 0, len(m.entries))
	for _, e := range m.entries {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// manifestKey hashes names, modes, link targets and content hashes.
func manifestKey(entries []entry) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", formatVersion)
	for _, e := range entries {
		sum := sha256.Sum256(e.data)
		fmt.Fprintf(h, "%q %o %q %x\n", e.name, uint32(e.mode), e.link, sum)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// writeArchive writes the entries as a newc cpio archive (uncompressed: the
// kernel unpacks it directly, which under TCG is faster than gunzip).
func writeArchive(dst string, entries []entry) (err error) {
	f, err := os.CreateTemp(filepath.Dir(dst), ".tmp-image-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	w := cpio.NewWriter(bw)
	for _, e := range entries {
		hdr := &cpio.Header{Name: e.name, Mode: e.mode}
		var body []byte
		switch {
		case e.mode&cpio.ModeType == cpio.TypeSymlink:
			body = []byte(e.link)
		case e.mode.IsRegular():
			body = e.data
		}
		hdr.Size = int64(len(body))
		if err := w.WriteHeader(hdr); err != nil {
			return fmt.Errorf("images: cpio %s: %w", e.name, err)
		}
		if _, err := w.Write(body); err != nil {
			return fmt.Errorf("images: cpio %s: %w", e.name, err)
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), dst)
}

// pruneImages removes other images of the same name that no build has used
// for keepUnused, and any image unused for keepAny.
func pruneImages(dir, name, keep string) {
	all, _ := filepath.Glob(filepath.Join(dir, "*.cpio"))
	for _, p := range all {
		st, err := os.Stat(p)
		if p == keep || err != nil {
			continue
		}
		// "name-KEY.cpio" only: not the images of a longer name "name-x".
		rest, same := strings.CutPrefix(filepath.Base(p), name+"-")
		rest = strings.TrimSuffix(rest, ".cpio")
		same = same && len(rest) == 20 && !strings.Contains(rest, "-")
		if age := time.Since(st.ModTime()); (same && age > keepUnused) || age > keepAny {
			os.Remove(p)
		}
	}
}

func writeTemp(dir string, data []byte) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, ".tmp-bin-")
	if err != nil {
		return "", err
	}
	_, werr := f.Write(data)
	if err := errors.Join(werr, f.Close()); err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// goCommand finds the go tool.
func (b *Builder) goCommand() string {
	if b.Go != "" {
		return b.Go
	}
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if r := os.Getenv("GOROOT"); r != "" {
		return filepath.Join(r, "bin", "go")
	}
	return "/usr/local/go/bin/go"
}

// buildProgram builds a Go package with the go tool and returns the
// binary. The output lives at a stable path under Dir/bin, because go build
// skips the link only when the existing output is up to date: an unchanged
// program costs about 0.1 s. A lock file serialises builders of the same
// output, also across processes.
func (b *Builder) buildProgram(ctx context.Context, root, dir string, p *Program) ([]byte, error) {
	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, err
	}
	key := sha256.Sum256(fmt.Appendf(nil, "%s\x00%s\x00%v\x00%v\x00%q", root, p.Package, p.CGO, p.Test, p.Tags))
	out := filepath.Join(bin, hex.EncodeToString(key[:8])+"-"+path.Base(p.GuestPath()))
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	args := []string{"build"}
	if p.Test {
		args = []string{"test", "-c"}
	}
	args = append(args, "-trimpath", "-buildvcs=false", "-o", out)
	if len(p.Tags) > 0 {
		args = append(args, "-tags", strings.Join(p.Tags, ","))
	}
	args = append(args, p.Package)
	cmd := exec.CommandContext(ctx, b.goCommand(), args...)
	cmd.Dir = root
	cgo := "CGO_ENABLED=0"
	if p.CGO {
		cgo = "CGO_ENABLED=1"
	}
	cmd.Env = append(os.Environ(), cgo, "GOOS=linux", "GOARCH=amd64")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return nil, &ToolError{Tool: "go", Args: args, Output: tail(msg, 4096), Err: err}
	}
	return os.ReadFile(out)
}
