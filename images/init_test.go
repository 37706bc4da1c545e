package images

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestInitScript(t *testing.T) {
	s := &Spec{Name: "n", Hostname: "h", Init: []string{"exit 7", "echo ok"}, Service: []string{"/sbin/agent", "-port", "a b'c"}}
	got := InitScript(s, "6.1.0-test", []string{"kernel/a.ko", "kernel/b.ko"})
	for _, want := range []string{
		"#!/bin/busybox sh\n",
		"mount -t devtmpfs",
		"exec </dev/console >/dev/console 2>&1",
		"hostname 'h'\n",
		`vsdp.hostname=*) hostname "${a#vsdp.hostname=}"`,
		"insmod '/lib/modules/6.1.0-test/kernel/a.ko' || fail 'insmod kernel/a.ko'\n",
		"(\nexit 7\n) || fail \"init[0] exited $?\"",
		`'/sbin/agent' '-port' 'a b'\''c'`,
		"while :; do",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("/init lacks %q:\n%s", want, got)
		}
	}
	if strings.Index(got, "kernel/a.ko") > strings.Index(got, "kernel/b.ko") {
		t.Error("modules out of order")
	}
	if s := InitScript(&Spec{Name: "x"}, "v", nil); !strings.Contains(s, "poweroff -f") {
		t.Errorf("no service: /init does not power off:\n%s", s)
	}
}

// TestInitScriptSyntax checks the generated script with busybox's own
// shell parser (sh -n).
func TestInitScriptSyntax(t *testing.T) {
	s := &Spec{Name: "n", Init: []string{"if true; then echo a; fi", "echo \"$HOME\""}, Service: []string{"/x", "it's"}}
	p := filepath.Join(t.TempDir(), "init")
	os.WriteFile(p, []byte(InitScript(s, "v", []string{"kernel/a.ko"})), 0o755)
	if out, err := exec.Command(DefaultBusybox, "sh", "-n", p).CombinedOutput(); err != nil {
		t.Errorf("sh -n: %v\n%s", err, out)
	}
}

func TestQuote(t *testing.T) {
	for in, want := range map[string]string{"": "''", "a b": "'a b'", "it's": `'it'\''s'`, "$x": "'$x'"} {
		if got := quote(in); got != want {
			t.Errorf("quote(%q) = %s, want %s", in, got, want)
		}
	}
}
