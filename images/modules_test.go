package images

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

const testDep = `kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko: kernel/drivers/infiniband/core/ib_uverbs.ko kernel/drivers/infiniband/core/ib_core.ko kernel/net/ipv6/ip6_udp_tunnel.ko kernel/net/ipv4/udp_tunnel.ko
kernel/drivers/infiniband/core/ib_uverbs.ko: kernel/drivers/infiniband/core/ib_core.ko
kernel/drivers/infiniband/core/ib_core.ko:
kernel/net/ipv6/ip6_udp_tunnel.ko:
kernel/net/ipv4/udp_tunnel.ko:
kernel/crypto/crc32_generic.ko:
kernel/arch/x86/crypto/crc32-pclmul.ko:

kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
`

func mustDeps(t *testing.T, s string) *DepTable {
	t.Helper()
	d, err := ParseModulesDep(strings.NewReader(s))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.AddBuiltin(strings.NewReader("kernel/lib/crc32.ko\nkernel/drivers/tty/serial/8250/8250.ko\n")); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/a/crc32-pclmul.ko":    "crc32_pclmul",
		"crc32_pclmul":                "crc32_pclmul",
		"kernel/fs/fuse/virtiofs.ko":  "virtiofs",
		"kernel/x/foo.ko.xz":          "foo",
		"kernel/x/foo-bar_baz.ko.zst": "foo_bar_baz",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseModulesDepRejects(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"no colon", "kernel/a.ko kernel/b.ko\n", "no ':'"},
		{"absolute", "/lib/a.ko:\n", "absolute"},
		{"dotdot", "../a.ko:\n", "unclean"},
		{"dotdot dep", "kernel/a.ko: kernel/../../b.ko\n", "unclean"},
		{"not a module", "kernel/a.txt:\n", "not a module"},
		{"empty path", ": kernel/a.ko\n", "empty"},
		{"duplicate", "kernel/a.ko:\nkernel/x/a.ko:\n", "twice"},
		{"too many deps", "kernel/a.ko:" + strings.Repeat(" kernel/b.ko", maxDepDeps+1) + "\n", "too many"},
		{"line too long", "kernel/a.ko: " + strings.Repeat("x", maxDepLine) + "\n", "too long"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseModulesDep(strings.NewReader(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err %v, want one with %q", err, tt.want)
			}
		})
	}
}

func TestResolve(t *testing.T) {
	d := mustDeps(t, testDep)
	tests := []struct {
		name  string
		in    []string
		want  []string // module names in load order
		noMod bool     // ErrNoModule expected
	}{
		{"leaf", []string{"fuse"}, []string{"fuse"}, false},
		{"virtio_net", []string{"virtio_net"}, []string{"failover", "net_failover", "virtio_ring", "virtio", "virtio_net"}, false},
		{"shared deps once", []string{"virtio_net", "virtiofs"}, []string{"failover", "net_failover", "virtio_ring", "virtio", "virtio_net", "fuse", "virtiofs"}, false},
		{"rxe gets crc32_generic", []string{"rdma_rxe"}, []string{"crc32_generic", "ib_core", "ib_uverbs", "ip6_udp_tunnel", "udp_tunnel", "rdma_rxe"}, false},
		{"dash name", []string{"crc32-pclmul"}, []string{"crc32_pclmul"}, false},
		{"builtin skipped", []string{"crc32", "8250", "fuse"}, []string{"fuse"}, false},
		{"repeat", []string{"fuse", "fuse"}, []string{"fuse"}, false},
		{"unknown", []string{"fuse", "nope"}, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files, err := d.Resolve(tt.in)
			if tt.noMod {
				if !errors.Is(err, ErrNoModule) {
					t.Errorf("err %v, want ErrNoModule", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, f := range files {
				names = append(names, ModuleName(f))
			}
			if !slices.Equal(names, tt.want) {
				t.Errorf("order %v, want %v", names, tt.want)
			}
		})
	}
}

func TestResolveCycle(t *testing.T) {
	d := mustDeps(t, "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n")
	var me *ModuleError
	if _, err := d.Resolve([]string{"a"}); !errors.As(err, &me) || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("err %v, want a cycle error", err)
	}
	d = mustDeps(t, "kernel/a.ko: kernel/missing.ko\n")
	if _, err := d.Resolve([]string{"a"}); !errors.Is(err, ErrNoModule) || !strings.Contains(err.Error(), "needed by a") {
		t.Errorf("err %v, want a missing dependency of a", err)
	}
}

// FuzzParseModulesDep: arbitrary modules.dep content never panics the
// parser or the resolver, and every resolved order lists each file once,
// each after the dependencies listed for it.
func FuzzParseModulesDep(f *testing.F) {
	f.Add(testDep, "rdma_rxe virtio_net")
	f.Add("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "a")
	f.Add("kernel/a.ko: kernel/b.ko kernel/b.ko\nkernel/b.ko:\n", "a b")
	f.Fuzz(func(t *testing.T, dep, names string) {
		d, err := ParseModulesDep(strings.NewReader(dep))
		if err != nil {
			return
		}
		order, err := d.Resolve(strings.Fields(names))
		if err != nil {
			return
		}
		pos := make(map[string]int)
		for i, f := range order {
			if _, dup := pos[f]; dup {
				t.Fatalf("%s listed twice", f)
			}
			pos[f] = i
		}
		for i, f := range order {
			for _, dep := range d.deps[ModuleName(f)] {
				file, ok := d.file[dep]
				if !ok {
					continue // built in
				}
				if j, ok := pos[file]; !ok || j > i {
					t.Fatalf("%s loaded before its dependency %s", f, file)
				}
			}
		}
	})
}
