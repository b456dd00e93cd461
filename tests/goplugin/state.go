package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
)

const checkpointFile = "checkpoint.json"

// preparedClaim is one claim's record in the checkpoint.
type preparedClaim struct {
	Namespace string                 `json:"namespace"`
	Name      string                 `json:"name"`
	Devices   []kubeletplugin.Device `json:"devices"`
}

type checkpoint struct {
	Version int                         `json:"version"`
	Claims  map[types.UID]preparedClaim `json:"claims"`
}

// state is what the plugin has prepared, in memory and in the checkpoint on disk.
type state struct {
	mu         sync.Mutex
	driverName string
	pool       string
	devices    map[string]int // device name -> minor
	cdi        *cdiWriter
	path       string
	prepared   checkpoint
}

func newState(driverName, pool string, gpus int, pluginDir, cdiRoot string) (*state, error) {
	devices := make(map[string]int, gpus)
	for minor := range gpus {
		devices[fmt.Sprintf("gpu-%d", minor)] = minor
	}
	cdi, err := newCDIWriter(cdiRoot, driverName)
	if err != nil {
		return nil, err
	}
	s := &state{driverName: driverName, pool: pool, devices: devices, cdi: cdi,
		path: filepath.Join(pluginDir, checkpointFile)}
	s.prepared, err = readCheckpoint(s.path)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// prepare writes the claim's CDI spec, then records it in the checkpoint; a claim
// prepared before gets its recorded devices back.
func (s *state) prepare(claim *resourceapi.ResourceClaim) ([]kubeletplugin.Device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if done, ok := s.prepared.Claims[claim.UID]; ok {
		return done.Devices, nil
	}
	var devices []kubeletplugin.Device
	var minors []int
	for _, result := range claim.Status.Allocation.Devices.Results {
		if result.Driver != s.driverName {
			continue
		}
		if result.Pool != s.pool {
			return nil, fmt.Errorf("status.allocation.devices.results: device %s is in pool %q, not this node's %q", result.Device, result.Pool, s.pool)
		}
		minor, ok := s.devices[result.Device]
		if !ok {
			return nil, fmt.Errorf("status.allocation.devices.results: no device %q on this node", result.Device)
		}
		minors = append(minors, minor)
		devices = append(devices, kubeletplugin.Device{
			Requests:     []string{result.Request},
			PoolName:     result.Pool,
			DeviceName:   result.Device,
			CDIDeviceIDs: []string{s.cdi.qualifiedName(claim.UID, result.Device)},
		})
	}
	if err := s.cdi.writeClaimSpec(claim.UID, devices, minors); err != nil {
		return nil, fmt.Errorf("CDI spec: %w", err)
	}
	s.prepared.Claims[claim.UID] = preparedClaim{Namespace: claim.Namespace, Name: claim.Name, Devices: devices}
	if err := writeCheckpoint(s.path, s.prepared); err != nil {
		delete(s.prepared.Claims, claim.UID)
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	return devices, nil
}

// unprepare removes the claim's CDI spec and its record; an unknown claim is done.
func (s *state) unprepare(uid types.UID) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	done, ok := s.prepared.Claims[uid]
	if !ok {
		return nil
	}
	if err := s.cdi.removeClaimSpec(uid); err != nil {
		return fmt.Errorf("CDI spec: %w", err)
	}
	delete(s.prepared.Claims, uid)
	if err := writeCheckpoint(s.path, s.prepared); err != nil {
		s.prepared.Claims[uid] = done
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

func readCheckpoint(path string) (checkpoint, error) {
	c := checkpoint{Version: 1, Claims: map[types.UID]preparedClaim{}}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, err
	}
	if err := json.Unmarshal(data, &c); err != nil {
		return c, fmt.Errorf("checkpoint %s: %w", path, err)
	}
	if c.Claims == nil {
		c.Claims = map[types.UID]preparedClaim{}
	}
	return c, nil
}

// writeCheckpoint replaces the checkpoint durably, as ours does: temp file, fsync,
// rename, fsync of the folder.
func writeCheckpoint(path string, c checkpoint) (err error) {
	data, err := json.Marshal(c)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".checkpoint-*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err = tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
