// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ModelRegistry
/// @notice Models nodes can serve: id -> manifest CID (IPFS), layer count, config hash, set by the publisher.
/// A model's id is keccak256 of its name; its layer count never changes, so node registrations stay valid.
contract ModelRegistry {
    struct Model {
        address publisher;
        uint16 layerCount;
        bytes32 configHash;
        string name;
        string manifestCid;
    }

    uint256 public constant MAX_NAME_LENGTH = 128;
    uint256 public constant MAX_CID_LENGTH = 128;

    mapping(bytes32 modelId => Model) private _models;

    event ModelRegistered(
        bytes32 indexed modelId, address indexed publisher, string name, string manifestCid, uint16 layerCount, bytes32 configHash
    );
    event ModelUpdated(bytes32 indexed modelId, string manifestCid, bytes32 configHash);
    event PublisherTransferred(bytes32 indexed modelId, address indexed previousPublisher, address indexed newPublisher);

    error ModelExists(bytes32 modelId);
    error UnknownModel(bytes32 modelId);
    error NotPublisher(bytes32 modelId, address caller);
    error InvalidName();
    error InvalidCid();
    error ZeroLayers();
    error ZeroAddress();

    /// @notice Register model `name` with the caller as publisher.
    /// @param name Human-readable unique name (1-128 bytes); the id is keccak256(name).
    /// @param manifestCid IPFS CID of the model's shard manifest (1-128 bytes).
    /// @param layerCount Number of transformer layers (nodes serve ranges inside it).
    /// @param configHash keccak256 of the model's config, so nodes and clients agree on the architecture.
    /// @return modelId The new model's id.
    function registerModel(string calldata name, string calldata manifestCid, uint16 layerCount, bytes32 configHash)
        external
        returns (bytes32 modelId)
    {
        if (bytes(name).length == 0 || bytes(name).length > MAX_NAME_LENGTH) revert InvalidName();
        _checkCid(manifestCid);
        if (layerCount == 0) revert ZeroLayers();
        modelId = modelIdOf(name);
        if (_models[modelId].publisher != address(0)) revert ModelExists(modelId);
        _models[modelId] = Model(msg.sender, layerCount, configHash, name, manifestCid);
        emit ModelRegistered(modelId, msg.sender, name, manifestCid, layerCount, configHash);
    }

    /// @notice Point a model at a new manifest/config (e.g. re-packed shards); publisher only.
    /// @param modelId The model.
    /// @param manifestCid New manifest CID.
    /// @param configHash New config hash.
    function updateModel(bytes32 modelId, string calldata manifestCid, bytes32 configHash) external {
        _onlyPublisher(modelId);
        _checkCid(manifestCid);
        Model storage model = _models[modelId];
        model.manifestCid = manifestCid;
        model.configHash = configHash;
        emit ModelUpdated(modelId, manifestCid, configHash);
    }

    /// @notice Hand a model over to `newPublisher`; publisher only.
    /// @param modelId The model.
    /// @param newPublisher The account that may update it from now on.
    function transferPublisher(bytes32 modelId, address newPublisher) external {
        _onlyPublisher(modelId);
        if (newPublisher == address(0)) revert ZeroAddress();
        emit PublisherTransferred(modelId, msg.sender, newPublisher);
        _models[modelId].publisher = newPublisher;
    }

    /// @notice The model registered under `modelId`; reverts with UnknownModel if none.
    function getModel(bytes32 modelId) external view returns (Model memory) {
        Model memory model = _models[modelId];
        if (model.publisher == address(0)) revert UnknownModel(modelId);
        return model;
    }

    /// @notice Layer count of `modelId`, 0 if it is not registered.
    function layerCountOf(bytes32 modelId) external view returns (uint16) {
        return _models[modelId].layerCount;
    }

    /// @notice The id of the model called `name`.
    function modelIdOf(string calldata name) public pure returns (bytes32) {
        return keccak256(bytes(name));
    }

    function _onlyPublisher(bytes32 modelId) private view {
        address publisher = _models[modelId].publisher;
        if (publisher == address(0)) revert UnknownModel(modelId);
        if (publisher != msg.sender) revert NotPublisher(modelId, msg.sender);
    }

    function _checkCid(string calldata cid) private pure {
        if (bytes(cid).length == 0 || bytes(cid).length > MAX_CID_LENGTH) revert InvalidCid();
    }
}
