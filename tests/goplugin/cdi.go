package main

import (
	"fmt"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	cdiparser "tags.cncf.io/container-device-interface/pkg/parser"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

const cdiClass = "claim"

// The device nodes every container with a GPU gets, as in our specs.
var commonNodes = []string{"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}

// cdiWriter writes one spec per claim with the CDI library the runtimes read specs with
// (validated, temp file and rename, no fsync: as ours). Its cache never refreshes: the
// plugin only writes, and a refresh rescans the whole folder after every write.
type cdiWriter struct {
	cache  *cdiapi.Cache
	vendor string
}

func newCDIWriter(root, driverName string) (*cdiWriter, error) {
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(root), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return nil, fmt.Errorf("CDI cache of %s: %w", root, err)
	}
	return &cdiWriter{cache: cache, vendor: "k8s." + driverName}, nil
}

// specName ends in .json: ours writes JSON (the library's default is YAML).
func (w *cdiWriter) specName(uid types.UID) string {
	return cdiapi.GenerateTransientSpecName(w.vendor, cdiClass, string(uid)) + ".json"
}

func (w *cdiWriter) qualifiedName(uid types.UID, device string) string {
	return cdiparser.QualifiedName(w.vendor, cdiClass, string(uid)+"-"+device)
}

func (w *cdiWriter) writeClaimSpec(uid types.UID, devices []kubeletplugin.Device, minors []int) error {
	common := make([]*cdispec.DeviceNode, 0, len(commonNodes))
	for _, path := range commonNodes {
		common = append(common, &cdispec.DeviceNode{Path: path})
	}
	spec := &cdispec.Spec{
		Kind: w.vendor + "/" + cdiClass,
		ContainerEdits: cdispec.ContainerEdits{
			Env:         []string{"NVIDIA_VISIBLE_DEVICES=void"},
			DeviceNodes: common,
		},
	}
	for i, device := range devices {
		spec.Devices = append(spec.Devices, cdispec.Device{
			Name: string(uid) + "-" + device.DeviceName,
			ContainerEdits: cdispec.ContainerEdits{
				DeviceNodes: []*cdispec.DeviceNode{{Path: fmt.Sprintf("/dev/nvidia%d", minors[i])}},
			},
		})
	}
	version, err := cdiapi.MinimumRequiredVersion(spec)
	if err != nil {
		return err
	}
	spec.Version = version
	return w.cache.WriteSpec(spec, w.specName(uid))
}

func (w *cdiWriter) removeClaimSpec(uid types.UID) error {
	return w.cache.RemoveSpec(w.specName(uid))
}
