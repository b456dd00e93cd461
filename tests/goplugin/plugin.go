package main

import (
	"context"
	"errors"
	"fmt"

	resourceapi "k8s.io/api/resource/v1"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"
)

// plugin answers the helper's calls one claim at a time, as dra-example-driver does.
type plugin struct {
	state      *state
	fatal      func()
	answerOnly bool // --answer-only: each claim is answered with no devices, nothing done
}

var _ kubeletplugin.DRAPlugin = (*plugin)(nil)

func (p *plugin) PrepareResourceClaims(ctx context.Context, claims []*resourceapi.ResourceClaim) (map[types.UID]kubeletplugin.PrepareResult, error) {
	klog.FromContext(ctx).V(2).Info("PrepareResourceClaims", "claims", len(claims))
	results := make(map[types.UID]kubeletplugin.PrepareResult, len(claims))
	for _, claim := range claims {
		if p.answerOnly {
			results[claim.UID] = kubeletplugin.PrepareResult{}
			continue
		}
		devices, err := p.state.prepare(claim)
		if err != nil {
			err = fmt.Errorf("prepare claim %s/%s: %w", claim.Namespace, claim.Name, err)
		}
		results[claim.UID] = kubeletplugin.PrepareResult{Devices: devices, Err: err}
	}
	return results, nil
}

func (p *plugin) UnprepareResourceClaims(ctx context.Context, claims []kubeletplugin.NamespacedObject) (map[types.UID]error, error) {
	klog.FromContext(ctx).V(2).Info("UnprepareResourceClaims", "claims", len(claims))
	results := make(map[types.UID]error, len(claims))
	for _, claim := range claims {
		if p.answerOnly {
			results[claim.UID] = nil
			continue
		}
		if err := p.state.unprepare(claim.UID); err != nil {
			results[claim.UID] = fmt.Errorf("unprepare claim %s: %w", claim.UID, err)
		} else {
			results[claim.UID] = nil
		}
	}
	return results, nil
}

// WatchHealthStatus: device health is not part of what this plugin is timed on.
func (p *plugin) WatchHealthStatus(context.Context, chan<- kubeletplugin.DeviceHealthReport) error {
	return kubeletplugin.ErrHealthNotSupported
}

func (p *plugin) HandleError(ctx context.Context, err error, msg string) {
	utilruntime.HandleErrorWithContext(ctx, err, msg)
	if !errors.Is(err, kubeletplugin.ErrRecoverable) {
		p.fatal()
	}
}
