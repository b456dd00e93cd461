// Command cdi-resolve resolves CDI device names the way containerd and CRI-O do, with
// the upstream CDI library (tags.cncf.io/container-device-interface): it loads the spec
// directories into a cache, refreshes it, and injects the devices into an empty OCI
// runtime spec. It prints that spec as JSON: exactly the edits a container would get
// (device nodes with type/major/minor, mounts, environment, hooks, device cgroup rules).
//
//	cdi-resolve --spec-dir DIR [--spec-dir DIR ...] VENDOR/CLASS=NAME ...
//
// Spec directories are in increasing priority, as in the runtimes' cdi_spec_dirs.
// Exit status 1 with the library's error when any device does not resolve or a spec
// it needs is invalid; invalid specs it does not need are listed under specErrors.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
)

type dirList []string

func (d *dirList) String() string     { return strings.Join(*d, ",") }
func (d *dirList) Set(v string) error { *d = append(*d, v); return nil }

type result struct {
	Devices    []string            `json:"devices"`
	OCISpec    *oci.Spec           `json:"ociSpec"`
	SpecErrors map[string][]string `json:"specErrors,omitempty"`
}

func main() {
	out, err := run(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "cdi-resolve:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "cdi-resolve:", err)
		os.Exit(1)
	}
}

func run(args []string) (*result, error) {
	var dirs dirList
	fs := flag.NewFlagSet("cdi-resolve", flag.ContinueOnError)
	fs.Var(&dirs, "spec-dir", "CDI spec directory (repeatable, lowest priority first)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	devices := fs.Args()
	if len(dirs) == 0 {
		return nil, errors.New("--spec-dir: at least one directory is required")
	}
	if len(devices) == 0 {
		return nil, errors.New("no CDI device names given")
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dirs...), cdi.WithAutoRefresh(false))
	if err != nil {
		return nil, err
	}
	// Like the runtimes: a broken spec elsewhere is reported, not fatal, unless a
	// requested device is in it (then it does not resolve).
	_ = cache.Refresh()
	specErrors := map[string][]string{}
	for path, errs := range cache.GetErrors() {
		for _, e := range errs {
			specErrors[path] = append(specErrors[path], e.Error())
		}
		sort.Strings(specErrors[path])
	}
	spec := &oci.Spec{}
	if _, err := cache.InjectDevices(spec, devices...); err != nil {
		if len(specErrors) > 0 {
			err = fmt.Errorf("%w (spec errors: %v)", err, specErrors)
		}
		return nil, err
	}
	return &result{Devices: devices, OCISpec: spec, SpecErrors: specErrors}, nil
}
