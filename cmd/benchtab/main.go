package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

type cell struct {
	nsPerOp float64
	mbps    float64
	perCore float64 // MB/cpu-s, 0 when not reported
	extra   []string
}

// perCoreUnit is the per-core throughput metric (vhosttest.ReportCPU).
const perCoreUnit = "MB/cpu-s"

type family struct {
	name  string
	cases []string
	impls []string
	cells map[[2]string]*cell
}

var lineRE = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)

func main() {
	benchtime := flag.String("benchtime", "1s", "go test -benchtime")
	run := flag.String("bench", ".", "go test -bench pattern")
	in := flag.String("in", "", "read benchmark output from this file instead of running go test (its VM tables too)")
	vm := flag.Bool("vm", false, "run the VM-tier benchmarks (QEMU guests, minutes) instead of the Go benchmarks")
	flag.Parse()
	if *vm && *in == "" {
		os.Exit(runVM())
	}
	pkgs := flag.Args()
	if len(pkgs) == 0 {
		pkgs = []string{"./..."}
	}
	var r io.Reader
	var saved string // the -in file, for its VM tables
	if *in != "" {
		b, err := os.ReadFile(*in)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		saved = string(b)
		r = strings.NewReader(saved)
	} else {
		args := append([]string{"test", "-run", "^$", "-bench", *run, "-benchtime", *benchtime, "-benchmem"}, pkgs...)
		cmd := exec.Command("go", args...)
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer func() {
			if err := cmd.Wait(); err != nil {
				fmt.Fprintln(os.Stderr, "benchtab: go test:", err)
				os.Exit(1)
			}
		}()
		r = out
	}
	fams, order := parse(r, os.Stdout)
	for _, name := range order {
		print(os.Stdout, fams[name])
	}
	for _, tb := range parseVM(strings.NewReader(saved)) {
		printVM(os.Stdout, tb)
	}
}

// parse reads go test output, echoing package lines, and collects cells.
func parse(r io.Reader, echo io.Writer) (map[string]*family, []string) {
	fams := map[string]*family{}
	var order []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		m := lineRE.FindStringSubmatch(line)
		if m == nil {
			if strings.HasPrefix(line, "ok ") || strings.HasPrefix(line, "FAIL") || strings.HasPrefix(line, "--- FAIL") || strings.HasPrefix(line, "panic") {
				fmt.Fprintln(echo, line)
			}
			continue
		}
		parts := strings.Split(m[1], "/")
		var fam, cs, impl string
		switch len(parts) {
		case 1:
			fam, cs, impl = parts[0], "-", "-"
		case 2:
			fam, cs, impl = parts[0], "-", parts[1]
		default:
			fam, cs, impl = parts[0], strings.Join(parts[1:len(parts)-1], "/"), parts[len(parts)-1]
		}
		f := fams[fam]
		if f == nil {
			f = &family{name: fam, cells: map[[2]string]*cell{}}
			fams[fam] = f
			order = append(order, fam)
		}
		if !contains(f.cases, cs) {
			f.cases = append(f.cases, cs)
		}
		if !contains(f.impls, impl) {
			f.impls = append(f.impls, impl)
		}
		c := &cell{}
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			switch unit := fields[i+1]; unit {
			case "ns/op":
				c.nsPerOp = v
			case "MB/s":
				c.mbps = v
			case "B/op", "allocs/op":
			case perCoreUnit:
				c.perCore = v
				c.extra = append(c.extra, fields[i]+" "+unit)
			default:
				c.extra = append(c.extra, fields[i]+" "+unit)
			}
		}
		f.cells[[2]string{cs, impl}] = c
	}
	return fams, order
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func rate(c *cell) (float64, string) {
	if c.mbps > 0 {
		return c.mbps, "MB/s"
	}
	if c.nsPerOp > 0 {
		return 1e9 / c.nsPerOp, "op/s"
	}
	return 0, ""
}

func print(w io.Writer, f *family) {
	impls := append([]string(nil), f.impls...)
	sort.SliceStable(impls, func(i, j int) bool {
		return strings.HasPrefix(impls[i], "baseline") && !strings.HasPrefix(impls[j], "baseline")
	})
	fmt.Fprintf(w, "\n## %s\n\n", strings.TrimPrefix(f.name, "Benchmark"))
	fmt.Fprintf(w, "| case |")
	for _, im := range impls {
		fmt.Fprintf(w, " %s |", im)
	}
	fmt.Fprintf(w, "\n|---|")
	for range impls {
		fmt.Fprintf(w, "---|")
	}
	fmt.Fprintln(w)
	var extras []string
	for _, cs := range f.cases {
		var base, basePerCore float64
		for _, im := range impls {
			if c := f.cells[[2]string{cs, im}]; c != nil && strings.HasPrefix(im, "baseline") && base == 0 {
				base, _ = rate(c)
				basePerCore = c.perCore
			}
		}
		fmt.Fprintf(w, "| %s |", cs)
		for _, im := range impls {
			c := f.cells[[2]string{cs, im}]
			if c == nil {
				fmt.Fprintf(w, " – |")
				continue
			}
			v, unit := rate(c)
			s := fmt.Sprintf("%s %s, %s/op", human(v, unit), unit, dur(c.nsPerOp))
			if base > 0 && !strings.HasPrefix(im, "baseline") {
				s += fmt.Sprintf(" (**%.2fx** baseline)", v/base)
			}
			fmt.Fprintf(w, " %s |", s)
			for _, e := range c.extra {
				if strings.HasSuffix(e, " "+perCoreUnit) && basePerCore > 0 && c.perCore > 0 &&
					!strings.HasPrefix(im, "baseline") {
					e += fmt.Sprintf(" (%.3gx baseline)", c.perCore/basePerCore)
				}
				extras = append(extras, fmt.Sprintf("%s/%s: %s", cs, im, e))
			}
		}
		fmt.Fprintln(w)
	}
	if len(extras) > 0 {
		fmt.Fprintln(w)
		for _, e := range extras {
			fmt.Fprintf(w, "- %s\n", e)
		}
	}
}

func human(v float64, unit string) string {
	switch {
	case unit == "MB/s":
		return fmt.Sprintf("%.1f", v)
	case v >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.1fk", v/1e3)
	default:
		return fmt.Sprintf("%.1f", v)
	}
}

func dur(ns float64) string {
	switch {
	case ns >= 1e9:
		return fmt.Sprintf("%.2fs", ns/1e9)
	case ns >= 1e6:
		return fmt.Sprintf("%.2fms", ns/1e6)
	case ns >= 1e3:
		return fmt.Sprintf("%.1fµs", ns/1e3)
	default:
		return fmt.Sprintf("%.0fns", ns)
	}
}
