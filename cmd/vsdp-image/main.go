package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"github.com/vsdp/vsdp/images"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "vsdp-image:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

const usage = `usage:
  vsdp-image kernel [-dir DIR]
  vsdp-image build -spec FILE [-kernel DIR] [-dir DIR]
  vsdp-image modules [-kernel DIR] MODULE...
  vsdp-image libs FILE...`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, usage)
		return flag.ErrHelp
	}
	root, err := images.FindModuleRoot(".")
	if err != nil {
		return err
	}
	defKernel := filepath.Join(root, "build", "kernel")
	fs := flag.NewFlagSet("vsdp-image "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	switch args[0] {
	case "kernel":
		dir := fs.String("dir", defKernel, "kernel cache directory")
		timeout := fs.Duration("timeout", 10*time.Minute, "give up after this long")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		k, err := images.FetchKernel(ctx, *dir)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s %s %s\n", k.Package, k.Version, k.BootImage())
		return nil
	case "build":
		spec := fs.String("spec", "", "JSON image spec (required)")
		kdir := fs.String("kernel", defKernel, "kernel cache directory")
		dir := fs.String("dir", filepath.Join(root, "build", "images"), "image cache directory")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *spec == "" || fs.NArg() != 0 {
			fmt.Fprintln(stderr, usage)
			return flag.ErrHelp
		}
		b, err := os.ReadFile(*spec)
		if err != nil {
			return err
		}
		var s images.Spec
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&s); err != nil {
			return fmt.Errorf("%s: %w", *spec, err)
		}
		bld := &images.Builder{Root: root, Dir: *dir}
		if len(s.Modules) > 0 {
			if bld.Kernel, err = images.LoadKernel(*kdir); err != nil {
				return err
			}
		}
		img, err := bld.Build(ctx, &s)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, img.Path)
		return nil
	case "modules":
		kdir := fs.String("kernel", defKernel, "kernel cache directory")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		k, err := images.LoadKernel(*kdir)
		if err != nil {
			return err
		}
		t, err := k.Deps()
		if err != nil {
			return err
		}
		order, err := t.Resolve(fs.Args())
		if err != nil {
			return err
		}
		for _, m := range order {
			fmt.Fprintln(stdout, m)
		}
		return nil
	case "libs":
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		libs, err := images.SharedDeps(fs.Args(), nil)
		if err != nil {
			return err
		}
		for _, l := range libs {
			fmt.Fprintln(stdout, l)
		}
		return nil
	}
	fmt.Fprintln(stderr, usage)
	return flag.ErrHelp
}
